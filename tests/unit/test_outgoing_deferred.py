"""Bookkeeping of deferred recipients (core.outgoing) and its JSON form (store.outgoing)."""

from __future__ import annotations

import datetime as dt

import pytest

from serversync.core.outgoing import (
    MAX_ATTEMPTS,
    RecipientResult,
    RecipientStatus,
    backoff,
    deferred_due,
    due_recipients,
    merge,
    settle,
    summary,
    too_many_recipients,
)
from serversync.store.outgoing import _results, _results_json

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
A, B, C = "a@example.test", "b@example.test", "c@example.test"
LATER = RecipientResult(B, RecipientStatus.DEFERRED, 450, "4.2.1 Mailbox busy")
FULL = RecipientResult(C, RecipientStatus.DEFERRED, 452, "4.5.3 Error: too many recipients")


@pytest.mark.parametrize(("code", "message", "expected"), [
    (452, "4.5.3 Error: too many recipients", True),  # Postfix
    (452, "Too many recipients", True),  # RFC 5321's example text
    (452, "4.2.2 Mailbox full", False),  # 452 is also "insufficient storage"
    (450, "4.5.3 too many recipients", False),
])
def test_too_many_recipients(code: int, message: str, expected: bool) -> None:
    assert too_many_recipients(code, message) is expected


def test_a_deferred_recipient_backs_off_like_a_whole_message() -> None:
    first = settle(LATER, 1, NOW, progressed=True)
    assert (first.status, first.attempts, first.next_attempt_at) == (
        RecipientStatus.DEFERRED, 1, NOW + dt.timedelta(minutes=1))
    sixth = settle(LATER, 6, NOW, progressed=True)
    assert sixth.next_attempt_at == NOW + backoff(6) == NOW + dt.timedelta(minutes=32)


def test_the_last_attempt_gives_up_with_the_reason() -> None:
    last = settle(LATER, MAX_ATTEMPTS, NOW, progressed=True)
    assert (last.status, last.code, last.attempts, last.next_attempt_at) == (
        RecipientStatus.FAILED, 450, MAX_ATTEMPTS, None)
    assert last.message == "gave up after 10 attempts; last reply: 450 4.2.1 Mailbox busy"


def test_too_many_recipients_is_due_at_once_and_not_counted_only_with_progress() -> None:
    more = settle(FULL, 3, NOW, progressed=True)
    assert (more.status, more.attempts, more.next_attempt_at) == (
        RecipientStatus.DEFERRED, 2, NOW)
    # nobody was accepted: a server answering 452 to everything must not loop for ever
    stuck = settle(FULL, 3, NOW, progressed=False)
    assert (stuck.attempts, stuck.next_attempt_at) == (3, NOW + backoff(3))
    assert settle(FULL, MAX_ATTEMPTS, NOW, progressed=False).status is RecipientStatus.FAILED


def test_settled_recipients_carry_the_attempt_and_no_next_one() -> None:
    accepted = settle(RecipientResult(A, RecipientStatus.ACCEPTED, 250, "ok",
                                      next_attempt_at=NOW), 2, NOW, progressed=True)
    assert (accepted.attempts, accepted.next_attempt_at) == (2, None)


def test_merge_replaces_in_place_and_keeps_order() -> None:
    before = (RecipientResult(A, RecipientStatus.ACCEPTED, 250), LATER,
              RecipientResult(C, RecipientStatus.REJECTED, 550))
    after = merge(before, [RecipientResult(B, RecipientStatus.ACCEPTED, 250, "ok", 2)])
    assert [(r.address, r.status) for r in after] == [
        (A, RecipientStatus.ACCEPTED), (B, RecipientStatus.ACCEPTED),
        (C, RecipientStatus.REJECTED)]


def test_due_recipients_and_the_next_follow_up() -> None:
    soon = settle(LATER, 1, NOW, progressed=True)
    now = settle(FULL, 2, NOW, progressed=True)
    results = (RecipientResult(A, RecipientStatus.ACCEPTED), soon, now)
    assert deferred_due(results) == NOW
    assert due_recipients(results, NOW) == (C,)
    assert due_recipients(results, NOW + dt.timedelta(minutes=1)) == (B, C)
    assert deferred_due((RecipientResult(A, RecipientStatus.ACCEPTED),)) is None


def test_summary_says_what_is_pending_and_what_failed() -> None:
    pending = settle(LATER, 1, NOW, progressed=True)
    rejected = RecipientResult(C, RecipientStatus.REJECTED, 550, "5.1.1 User unknown")
    error, code = summary((RecipientResult(A, RecipientStatus.ACCEPTED), pending, rejected))
    assert code == "recipients-deferred"
    assert error == (f"delivery to {B} pending: 450 4.2.1 Mailbox busy (attempt 1 of 10, next "
                     "at 2026-03-01T12:01:00+00:00); not delivered to "
                     f"{C}: 550 5.1.1 User unknown")
    gave_up = settle(LATER, MAX_ATTEMPTS, NOW, progressed=True)
    assert summary((gave_up,)) == (
        f"not delivered to {B}: gave up after 10 attempts; last reply: 450 4.2.1 Mailbox busy",
        "recipients-refused")
    assert summary((RecipientResult(A, RecipientStatus.ACCEPTED),)) == (None, None)


def test_json_round_trip_and_entries_written_before_attempts_existed() -> None:
    results = (RecipientResult(A, RecipientStatus.ACCEPTED, 250, "ok", 1),
               settle(LATER, 1, NOW, progressed=True))
    assert _results(_results_json(results)) == results
    assert "next_attempt_at" not in _results_json(results)[0]
    legacy = _results([{"address": A, "status": "rejected", "code": 550, "message": "no"}])
    assert legacy == (RecipientResult(A, RecipientStatus.REJECTED, 550, "no", 0, None),)
