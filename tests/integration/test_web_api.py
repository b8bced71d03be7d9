"""The REST API end to end over ASGI: every route, auth failures, roles and secret redaction.

Runs on SQLite and PostgreSQL (the ``services`` fixture). Test & Enable goes to the real
loopback Dovecot as heidi (this suite's user). Every response body of a test is recorded,
and no secret given to the API may appear in any of them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from serversync.core.access import Role
from serversync.core.email import (
    Attachment,
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
)
from serversync.core.email import (
    Role as AddressRole,
)
from serversync.core.model import Alert, Channel, Severity
from serversync.core.schedule import Outcome
from serversync.services import Services
from serversync.services.tokens import Tokens
from serversync.store.emails import EmailStore
from serversync.store.runs import RunStore
from serversync.web import act_api, outgoing_api
from serversync.web.api import router
from serversync.web.app import create_app
from tests import testservers as ts

HEIDI = "heidi@example.test"
PROFILE_SECRET = "Pr0file-S3cret-never-shown"
MAILBOX_SECRET = "M4ilbox-S3cret-never-shown"
WEBHOOK_SECRET = "W3bhook-S3cret-never-shown"
SECRETS = (PROFILE_SECRET, MAILBOX_SECRET, WEBHOOK_SECRET, ts.USERS[HEIDI])
IMAPS = {"host": ts.HOST, "port": ts.IMAPS_PORT, "tls": "implicit"}


@dataclass
class Api:
    client: httpx.AsyncClient
    admin: str
    reader: str
    services: Services
    app: Any
    bodies: list[str] = field(default_factory=list)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    async def call(self, method: str, url: str, *, token: str | None = None,
                   expect: int = 200, **kwargs: Any) -> Any:
        response = await self.client.request(method, url, headers=self.auth(token), **kwargs)
        assert response.status_code == expect, (method, url, response.text)
        return response.json() if response.content and "json" in response.headers.get(
            "content-type", "") else response


@pytest.fixture
async def api(services: Services) -> AsyncIterator[Api]:
    app = create_app(services)
    tokens = Tokens(services.db)
    admin = (await tokens.create("admin", Role.ADMIN)).value
    reader = (await tokens.create("reader", Role.READER)).value
    bodies: list[str] = []

    async def record(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(response.text)
        bodies.append(str(response.headers))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                 event_hooks={"response": [record]}) as client:
        yield Api(client, admin, reader, services, app, bodies)


def api_routes(app: Any) -> list[tuple[str, str]]:
    out = set()
    # Included routers appear in app.routes only as wrappers in this FastAPI version: list
    # every router the app includes, so a new route cannot escape these checks.
    for route in [*router.routes, *outgoing_api.router.routes, *act_api.router.routes,
                  *app.routes]:
        if isinstance(route, APIRoute) and (route.path.startswith("/api/v1")
                                            or route.path == "/metrics"):
            path = re.sub(r"\{[^}]+\}", lambda m: "1" if m.group(0).endswith("id}") or
                          "position" in m.group(0) else "x", route.path)
            path = path.replace("/channels/x", "/channels/incoming").replace(
                "/directory/x/", "/directory/user/")
            for method in route.methods:
                out.add((method, path))
    return sorted(out)


async def test_every_route_needs_a_valid_token_and_readers_only_read(api: Api) -> None:
    routes = api_routes(api.app)
    assert len(routes) >= 40
    for method, path in routes:
        missing = await api.client.request(method, path)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert missing.json()["error"]["code"] == "unauthenticated"
        wrong = await api.client.request(method, path, headers=api.auth("sst_wrong-token"))
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "bad-token"
        if method != "GET":
            denied = await api.client.request(method, path, headers=api.auth(api.reader),
                                              json={})
            assert denied.status_code == 403, (method, path, denied.text)
            assert denied.json()["error"]["code"] == "read-only"


async def test_profiles_and_reach_with_write_only_secrets(api: Api) -> None:
    created = await api.call("POST", "/api/v1/profiles", expect=201, json={
        "name": "svc", "kind": "imap", "incoming": IMAPS, "credential_source": "profile",
        "service_user": ts.SVC, "service_secret": PROFILE_SECRET, "use_impersonation": True,
        "impersonation_scope": ["@example.test"], "ca_file": str(ts.CA_FILE)})
    assert created["service_secret"] == "set" and created["client_secret"] == "not set"
    assert created["access"] == "impersonation" and created["mailboxes"] == 0
    listed = await api.call("GET", "/api/v1/profiles", token=api.reader)
    assert [p["name"] for p in listed] == ["svc"] and listed[0]["service_secret"] == "set"
    changed = await api.call("PATCH", "/api/v1/profiles/svc",
                             json={"description": "service account", "service_secret": "x" * 12})
    assert changed["description"] == "service account" and changed["service_secret"] == "set"
    reach = await api.call("GET", "/api/v1/profiles/svc/reach")
    assert reach["uses_service_account"] and reach["scope"] == ["@example.test"]
    assert "compromised" in reach["warning"] and "0 mailbox" in reach["warning"]
    one = await api.call("GET", "/api/v1/profiles/svc", token=api.reader)
    assert one["impersonation_scope"] == ["@example.test"]
    # config-file references would make the server read its own env or files: refused
    refused = await api.call("POST", "/api/v1/profiles", expect=422, json={
        "name": "env", "kind": "imap", "incoming": IMAPS, "credential_source": "profile",
        "service_user": ts.SVC, "service_secret": {"file": "/etc/shadow"}})
    assert refused["error"]["message"].startswith("service_secret:")
    unknown = await api.call("POST", "/api/v1/profiles", expect=422,
                             json={"name": "x", "kind": "imap", "colour": "red"})
    assert unknown["error"] == {"code": "config", "message": "colour: unknown field", "fix": ""}
    dup = await api.call("POST", "/api/v1/profiles", expect=409, json={"name": "svc",
                                                                         "kind": "imap"})
    assert dup["error"]["code"] == "exists"
    await api.call("GET", "/api/v1/profiles/nope", expect=404)
    reports = await api.call("POST", "/api/v1/profiles/svc/test-enable")
    assert reports == []
    await api.call("DELETE", "/api/v1/profiles/svc", expect=204)
    assert await api.call("GET", "/api/v1/profiles") == []
    assert_no_secrets(api)


async def setup_heidi(api: Api, password: str) -> None:
    await api.call("POST", "/api/v1/profiles", expect=201, json={
        "name": "own", "kind": "imap", "incoming": IMAPS, "credential_source": "mailbox",
        "ca_file": str(ts.CA_FILE)})
    party = await api.call("POST", "/api/v1/directory", json={
        "kind": "user", "key": "heidi", "name": "Heidi", "emails": [HEIDI]})
    assert party["emails"] == [HEIDI]
    created = await api.call("POST", "/api/v1/mailboxes", expect=201, json={
        "address": HEIDI, "profile": "own", "owner": "heidi", "incoming": "server-side",
        "allow_credentials": True, "username": HEIDI, "secret": password})
    assert created["secret"] == "set" and created["incoming"] == {
        "method": "server-side", "enabled": False, "status": "not-run"}


@pytest.mark.usefixtures("test_servers")
async def test_mailboxes_test_enable_approval_channels_and_sync_now(api: Api) -> None:
    await setup_heidi(api, MAILBOX_SECRET)  # the wrong password
    mailboxes = await api.call("GET", "/api/v1/mailboxes?profile=own", token=api.reader)
    assert [m["address"] for m in mailboxes] == [HEIDI] and mailboxes[0]["secret"] == "set"
    # not approved yet: refused before connecting
    report = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/test-enable")
    assert not report["ok"] and report["results"][0]["code"] == "not-approved"
    approved = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/approve")
    assert approved["approval"] == "approved"
    # the real Dovecot refuses the wrong password: failure, alert, channel stays off
    report = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/test-enable")
    assert not report["ok"] and report["results"][0]["code"] == "auth-failed"
    alerts = await api.call("GET", f"/api/v1/mailboxes/{HEIDI}/alerts", token=api.reader)
    assert [a["code"] for a in alerts] == ["auth-failed"] and alerts[0]["channel"] == "incoming"
    everywhere = await api.call("GET", "/api/v1/alerts?mailbox=" + HEIDI)
    assert [a["id"] for a in everywhere] == [alerts[0]["id"]]
    enable = await api.call("PUT", f"/api/v1/mailboxes/{HEIDI}/channels/incoming", expect=409,
                            json={"enabled": True})
    assert enable["error"]["code"] == "not-tested"
    sync = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/channels/incoming/sync",
                          expect=409)
    assert sync["error"]["code"] == "channel-disabled"
    # fix the password: the test passes, the channel is enabled, "sync now" is accepted
    fixed = await api.call("PATCH", f"/api/v1/mailboxes/{HEIDI}", json={
        "secret": ts.USERS[HEIDI]})
    assert fixed["secret"] == "set"
    report = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/test-enable")
    assert report["ok"], report
    assert await api.call("GET", f"/api/v1/mailboxes/{HEIDI}/alerts") == []
    requested = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/channels/incoming/sync",
                               expect=202)
    assert requested["requested"] is True
    schedule = await api.call("GET", f"/api/v1/mailboxes/{HEIDI}/schedule", token=api.reader)
    assert schedule[0]["channel"] == "incoming" and schedule[0]["requested_at"] is not None
    assert (await api.call("GET", "/api/v1/schedules"))[0]["mailbox"] == HEIDI
    off = await api.call("PUT", f"/api/v1/mailboxes/{HEIDI}/channels/incoming",
                         json={"enabled": False})
    assert off["incoming"]["enabled"] is False
    on = await api.call("PUT", f"/api/v1/mailboxes/{HEIDI}/channels/incoming",
                        json={"enabled": True})
    assert on["incoming"] == {"method": "server-side", "enabled": True, "status": "success"}
    await api.call("PUT", f"/api/v1/mailboxes/{HEIDI}/channels/act", expect=409,
                   json={"enabled": True})
    rejected = await api.call("POST", f"/api/v1/mailboxes/{HEIDI}/reject")
    assert rejected["approval"] == "rejected" and rejected["incoming"]["enabled"] is False
    one = await api.call("GET", f"/api/v1/mailboxes/{HEIDI}")
    assert one["approval"] == "rejected"
    # the directory record owns a mailbox: it cannot go first
    in_use = await api.call("DELETE", "/api/v1/directory/user/heidi", expect=409)
    assert in_use["error"]["code"] == "party-in-use"
    await api.call("DELETE", f"/api/v1/mailboxes/{HEIDI}", expect=204)
    await api.call("DELETE", "/api/v1/directory/user/heidi", expect=204)
    assert await api.call("GET", "/api/v1/directory?kind=user") == []
    await api.call("GET", f"/api/v1/mailboxes/{HEIDI}", expect=404)
    assert_no_secrets(api)


async def test_directory_settings_alerts_runs_stats_and_metrics(api: Api) -> None:
    await api.call("POST", "/api/v1/profiles", expect=201, json={
        "name": "own", "kind": "imap", "incoming": IMAPS, "credential_source": "mailbox"})
    await api.call("POST", "/api/v1/directory", json={"kind": "user", "key": "heidi",
                                                      "emails": [HEIDI]})
    await api.call("POST", "/api/v1/directory", json={"kind": "contact", "key": "c1",
                                                      "emails": ["c1@elsewhere.test"]})
    assert [p["key"] for p in await api.call("GET", "/api/v1/directory")] == ["c1", "heidi"]
    bad = await api.call("POST", "/api/v1/directory", expect=422,
                         json={"kind": "user", "key": "x", "emails": ["not an address"]})
    assert bad["error"]["message"].startswith("emails")
    await api.call("POST", "/api/v1/mailboxes", expect=201, json={
        "address": HEIDI, "profile": "own", "owner": "heidi", "incoming": "server-side"})
    settings = await api.call("GET", "/api/v1/settings", token=api.reader)
    assert settings["process_only_approved_mailboxes"] is True
    settings["tracking_token_prefix"] = "ACME"
    assert (await api.call("PUT", "/api/v1/settings", json=settings))[
        "tracking_token_prefix"] == "ACME"
    assert (await api.call("GET", "/api/v1/settings"))["tracking_token_prefix"] == "ACME"
    now = dt.datetime.now(dt.UTC)
    async with api.services.db.transaction() as repo:
        alert = await repo.add_alert(Alert(Severity.ERROR, "auth-failed", "refused", "fix it",
                                           mailbox=HEIDI, channel=Channel.INCOMING))
        runs = RunStore(repo.session)
        run_id = await runs.start_run(HEIDI, Channel.INCOMING, now - dt.timedelta(seconds=3))
        await runs.finish_run(run_id, now, items=7, failures=1, outcome=Outcome.SUCCESS)
    listed = await api.call("GET", "/api/v1/alerts", token=api.reader)
    assert [a["id"] for a in listed] == [alert.id] and listed[0]["severity"] == "error"
    runs_out = await api.call("GET", f"/api/v1/runs?mailbox={HEIDI}", token=api.reader)
    assert runs_out[0]["items"] == 7 and runs_out[0]["seconds"] == pytest.approx(3, abs=0.01)
    stats = await api.call("GET", "/api/v1/stats?hours=2")
    assert stats["totals"]["items"] == 7 and stats["latency_s"]["count"] == 1
    metrics = await api.call("GET", "/metrics", token=api.reader)
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'serversync_alerts_open{severity="error"} 1.0' in text
    assert 'serversync_mailbox_channels{channel="incoming",state="disabled"} 1.0' in text
    assert 'serversync_sync_items_24h{channel="incoming"} 7.0' in text
    assert 'serversync_sync_item_failures_24h{channel="incoming"} 1.0' in text
    assert 'serversync_sync_duration_seconds{quantile="0.5"} 3.0' in text
    assert 'serversync_mailbox_approval{approval="empty"} 1.0' in text
    await api.call("POST", f"/api/v1/alerts/{alert.id}/resolve", expect=204)
    await api.call("POST", f"/api/v1/alerts/{alert.id}/resolve", expect=404)
    assert await api.call("GET", "/api/v1/alerts") == []
    assert len(await api.call("GET", "/api/v1/alerts?include_resolved=true")) == 1
    assert "0.0" in (await api.call("GET", "/metrics")).text


async def test_email_activities_are_readable(api: Api) -> None:
    async with api.services.db.transaction() as repo:
        store = EmailStore(repo.session)
        first = await store.add(EmailActivity(
            Direction.INCOMING, EmailStatus.RECEIVED, "Quote <b>", "ann@elsewhere.test",
            recipients=(Recipient(AddressRole.TO, HEIDI, "Heidi", "user", "heidi"),),
            message_id="<q1@elsewhere.test>", body_text="hello", body_html="<p>hello</p>",
            attachments=(Attachment("q.pdf", "application/pdf", 4, b"%PDF"),
                         Attachment("big.iso", "application/octet-stream", 10**9, None,
                                    notice="larger than the limit; not stored"))))
        second = await store.add(EmailActivity(
            Direction.OUTGOING, EmailStatus.PENDING_SEND, "Re: Quote", HEIDI,
            sender_mailbox=HEIDI))
    listed = await api.call("GET", "/api/v1/activities/emails", token=api.reader)
    assert [e["id"] for e in listed] == [second.id, first.id]
    assert listed[1]["body_text"] is None  # bodies only when one activity is read
    page = await api.call("GET", f"/api/v1/activities/emails?before_id={second.id}&limit=1")
    assert [e["id"] for e in page] == [first.id]
    outgoing = await api.call("GET", f"/api/v1/activities/emails?direction=outgoing"
                                     f"&status=pending-send&mailbox={HEIDI}")
    assert [e["id"] for e in outgoing] == [second.id]
    one = await api.call("GET", f"/api/v1/activities/emails/{first.id}", token=api.reader)
    assert one["subject"] == "Quote <b>" and one["body_html"] == "<p>hello</p>"
    assert one["recipients"][0]["party_key"] == "heidi"
    assert [a["stored"] for a in one["attachments"]] == [True, False]
    content = await api.call("GET", f"/api/v1/activities/emails/{first.id}/attachments/0")
    assert content.content == b"%PDF"
    assert content.headers["content-disposition"] == 'attachment; filename="q.pdf"'
    assert content.headers["content-type"] == "application/octet-stream"
    missing = await api.call("GET", f"/api/v1/activities/emails/{first.id}/attachments/1",
                             expect=404)
    assert "not kept" in missing["error"]["message"]
    await api.call("GET", f"/api/v1/activities/emails/{first.id}/attachments/5", expect=404)
    await api.call("GET", "/api/v1/activities/emails/999999", expect=404)


async def test_tokens_and_webhooks_routes(api: Api) -> None:
    created = await api.call("POST", "/api/v1/tokens", expect=201,
                             json={"name": "ci", "role": "reader"})
    value = created["token"]
    assert value.startswith("sst_") and created["prefix"] == value[:8]
    names = [t["name"] for t in await api.call("GET", "/api/v1/tokens")]
    assert names == ["admin", "ci", "reader"]
    assert value not in str(await api.call("GET", "/api/v1/tokens"))
    await api.call("GET", "/api/v1/profiles", token=value)
    await api.call("DELETE", "/api/v1/tokens/ci", expect=204)
    await api.call("GET", "/api/v1/profiles", token=value, expect=401)
    await api.call("DELETE", "/api/v1/tokens/ci", expect=404)
    revoked = await api.call("GET", "/api/v1/tokens?include_revoked=true")
    assert [t["revoked_at"] is not None for t in revoked if t["name"] == "ci"] == [True]

    hook = await api.call("POST", "/api/v1/webhooks", expect=201, json={
        "url": "https://hooks.example.test/in", "events": ["alert.created", "email.tracked"],
        "secret": WEBHOOK_SECRET})
    assert hook["secret"] == "set" and hook["generated_secret"] is None
    generated = await api.call("POST", "/api/v1/webhooks", expect=201, json={
        "url": "http://127.0.0.1:9/x", "events": ["email.sent"]})
    shown_once = generated["generated_secret"]
    assert shown_once and len(shown_once) >= 32
    await api.call("POST", "/api/v1/webhooks", expect=422, json={
        "url": "https://user:pw@hooks.example.test/", "events": ["email.sent"]})
    await api.call("POST", "/api/v1/webhooks", expect=422, json={
        "url": "ftp://hooks.example.test/", "events": ["email.sent"]})
    await api.call("POST", "/api/v1/webhooks", expect=422, json={
        "url": "https://hooks.example.test/", "events": []})
    listed = await api.call("GET", "/api/v1/webhooks", token=api.reader)
    assert [h["secret"] for h in listed] == ["set", "set"]
    one = await api.call("GET", f"/api/v1/webhooks/{hook['id']}")
    assert one["events"] == ["alert.created", "email.tracked"]
    paused = await api.call("PATCH", f"/api/v1/webhooks/{hook['id']}", json={"active": False})
    assert paused["active"] is False
    await api.call("POST", f"/api/v1/webhooks/{hook['id']}/ping", expect=202)
    deliveries = await api.call("GET", f"/api/v1/webhooks/{hook['id']}/deliveries")
    assert [(d["event"], d["status"]) for d in deliveries] == [("ping", "pending")]
    await api.call("DELETE", f"/api/v1/webhooks/{generated['id']}", expect=204)
    await api.call("GET", f"/api/v1/webhooks/{generated['id']}", expect=404)
    await api.call("GET", f"/api/v1/webhooks/{generated['id']}/deliveries", expect=404)
    assert_no_secrets(api, shown_once_ok=shown_once)


def assert_no_secrets(api: Api, shown_once_ok: str | None = None) -> None:
    everything = "\n".join(api.bodies)
    for secret in SECRETS:
        assert secret not in everything
    if shown_once_ok:
        assert everything.count(shown_once_ok) == 1  # in the creating response only


async def test_outgoing_email_can_be_created_and_cancelled(api: Api) -> None:
    await api.call("POST", "/api/v1/profiles", expect=201, json={
        "name": "own", "kind": "imap", "incoming": IMAPS, "credential_source": "mailbox",
        "outgoing": {"host": ts.HOST, "port": ts.SUBMISSION_PORT, "tls": "starttls"}})
    await api.call("POST", "/api/v1/directory", json={"kind": "user", "key": "heidi",
                                                      "emails": [HEIDI]})
    await api.call("POST", "/api/v1/mailboxes", expect=201, json={
        "address": HEIDI, "profile": "own", "owner": "heidi", "outgoing": "server-side"})
    await api.call("POST", "/api/v1/activities/emails", token=api.reader, expect=403, json={})
    created = await api.call("POST", "/api/v1/activities/emails", expect=201, json={
        "sender_mailbox": HEIDI, "subject": "Quote", "to": ["ann@elsewhere.test"],
        "text": "hello", "attachments": [{"name": "a.txt", "content_base64": "aGk="}]})
    assert created["status"] == "pending-send" and created["attachments"][0]["size"] == 2
    bad = await api.call("POST", "/api/v1/activities/emails", expect=422, json={
        "sender_mailbox": HEIDI, "subject": "x", "to": ["a@b.test"],
        "attachments": [{"name": "a", "content_base64": "***"}]})
    assert bad["error"]["message"].startswith("attachments[0].content_base64")
    await api.call("POST", f"/api/v1/activities/emails/{created['id']}/cancel", expect=204)
    one = await api.call("GET", f"/api/v1/activities/emails/{created['id']}")
    assert one["status"] == "canceled"
