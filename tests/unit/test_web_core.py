"""Roles, token hashing, webhook signatures and retry delays, and chart escaping."""

from __future__ import annotations

import hashlib

import pytest

from serversync.core.access import Role, display_prefix, new_token, token_hash
from serversync.core.secret import Secret
from serversync.core.webhooks import (
    BASE_DELAY_S,
    MAX_DELAY_S,
    Event,
    Webhook,
    retry_delay,
    signature,
    verify,
)
from serversync.web import charts


@pytest.mark.parametrize(("role", "method", "allowed"), [
    (Role.ADMIN, "GET", True), (Role.ADMIN, "POST", True), (Role.ADMIN, "DELETE", True),
    (Role.READER, "GET", True), (Role.READER, "head", True), (Role.READER, "POST", False),
    (Role.READER, "PUT", False), (Role.READER, "PATCH", False), (Role.READER, "DELETE", False),
])
def test_roles(role: Role, method: str, allowed: bool) -> None:
    assert role.may(method) is allowed


def test_tokens_are_random_and_stored_as_sha256() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("sst_") and len(a) > 40
    assert token_hash(a) == hashlib.sha256(a.encode()).hexdigest()
    assert display_prefix(a) == a[:8] and a not in token_hash(a)


SECRET = Secret("whsec-0123456789abcdef")


def test_signature_verifies_and_detects_tampering() -> None:
    body = b'{"event":"ping"}'
    header = signature(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, header, body, now=1_700_000_010)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_010)  # body changed
    assert not verify(Secret("another-secret-value"), header, body, now=1_700_000_010)
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # replayed too late
    forged = header.replace("t=1700000000", "t=1700000500")  # timestamp is under the MAC
    assert not verify(SECRET, forged, body, now=1_700_000_500)
    assert not verify(SECRET, "garbage", body, now=1_700_000_000)
    assert "whsec" not in header


def test_retry_delay_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    assert retry_delay(1, lambda: 1.0) == BASE_DELAY_S
    assert retry_delay(2, lambda: 1.0) == 2 * BASE_DELAY_S
    assert retry_delay(5, lambda: 1.0) == 16 * BASE_DELAY_S
    assert retry_delay(30, lambda: 1.0) == MAX_DELAY_S
    assert retry_delay(3, lambda: 0.0) == 1.0  # never hammer at once
    assert 1.0 <= retry_delay(4, lambda: 0.5) <= 4 * BASE_DELAY_S


def test_webhook_subscriptions() -> None:
    hook = Webhook("https://h.example/x", (Event.ALERT_CREATED,))
    assert hook.wants(Event.ALERT_CREATED) and hook.wants(Event.PING)
    assert not hook.wants(Event.EMAIL_SENT)
    assert not Webhook("https://h.example/x", (Event.ALERT_CREATED,), active=False).wants(
        Event.ALERT_CREATED)


def test_charts_escape_labels_and_render_values() -> None:
    svg = str(charts.stacked_bars("t<script>", [("<b>in</b>", [("success", 3), ("failure", 1)])]))
    assert "<script>" not in svg and "&lt;b&gt;in&lt;/b&gt;" in svg
    assert "success: 3" in svg and 'role="img"' in svg
    bars = str(charts.hourly_bars("h", ["2024-01-01T10:00:00+00:00"] * 2,
                                  [("items", [5, 0]), ("failures", [1, 2])]))
    assert bars.count("<rect") >= 3 and "items: 5" in bars
    empty = str(charts.value_bars("lat", [("p50", None)], "s"))
    assert "no runs yet" in empty
