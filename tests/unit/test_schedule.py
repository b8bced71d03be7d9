"""core.schedule: adaptive polling, jitter, backoff, classification and the profile rule."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from serversync.core.errors import (
    AuthError,
    ConfigError,
    ItemError,
    PermanentError,
    RuleViolation,
    TransientError,
)
from serversync.core.schedule import (
    Backoff,
    Failure,
    Outcome,
    Polling,
    ScheduleState,
    after_run,
    classify,
    percentile,
    profile_failing,
    requested,
)

T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)


def seconds(state: ScheduleState, now: dt.datetime) -> float:
    assert state.next_run_at is not None
    return (state.next_run_at - now).total_seconds()


def transient(message: str = "connection refused", retry_after: float | None = None) -> Failure:
    return Failure(Outcome.TRANSIENT, "network", message, "check the server", retry_after)


@pytest.mark.parametrize(("exc", "outcome", "code"), [
    (TransientError("busy", code="server-busy", retry_after=40), Outcome.TRANSIENT, "server-busy"),
    (AuthError("wrong password", fix="update it"), Outcome.PERMANENT, "auth-failed"),
    (PermanentError("no IDLE", code="tls"), Outcome.PERMANENT, "tls"),
    (ConfigError("port", "bad"), Outcome.PERMANENT, "config"),
    (RuleViolation("delegation cannot sync ACT"), Outcome.PERMANENT, "rule"),
    (ItemError("one bad item escaped"), Outcome.TRANSIENT, "bad-item"),
    (ConnectionResetError(104, "reset"), Outcome.TRANSIENT, "network"),
    (TimeoutError(), Outcome.TRANSIENT, "timeout"),
    (KeyError("bug"), Outcome.TRANSIENT, "internal"),
])
def test_classify(exc: BaseException, outcome: Outcome, code: str) -> None:
    failure = classify(exc)
    assert (failure.outcome, failure.code) == (outcome, code)
    assert failure.message


def test_classify_keeps_retry_after_and_fix() -> None:
    failure = classify(TransientError("throttled", fix="wait", retry_after=120))
    assert failure.retry_after == 120 and failure.fix == "wait"


def test_polling_speeds_up_while_mail_flows_and_slows_down_when_idle() -> None:
    polling = Polling(min_s=60, idle_max_s=720, growth=1.5, jitter=0.0)
    state, now, delays = ScheduleState(), T0, []
    for items in (5, 3, 0, 0, 0, 0, 0, 0, 0, 0, 2):
        state = after_run(state, now, items=items, polling=polling, rng=random.Random(1)).state
        delays.append(seconds(state, now))
        now = state.next_run_at or now
    assert delays[:2] == [60, 60]  # mail flowing: the profile's minimum
    idle = delays[2:10]
    assert idle == sorted(idle) and idle[0] == 90 and idle[-1] == 720  # grows to the ceiling
    assert delays[10] == 60  # mail again: fast again


def test_polling_never_below_the_profile_minimum_even_with_jitter() -> None:
    polling = Polling(min_s=300, idle_max_s=120, jitter=0.5)  # ceiling below the minimum
    rng = random.Random(7)
    for idle_runs in range(6):
        state = ScheduleState(idle_runs=idle_runs)
        delay = seconds(after_run(state, T0, items=1, polling=polling, rng=rng).state, T0)
        assert delay >= 300
        delay = seconds(after_run(state, T0, polling=polling, rng=rng).state, T0)
        assert delay >= 300


def test_jitter_spreads_mailboxes_enabled_together() -> None:
    polling = Polling(min_s=60, idle_max_s=720, jitter=0.1)
    rng = random.Random(3)
    delays = {seconds(after_run(ScheduleState(idle_runs=10), T0, polling=polling,
                                rng=rng).state, T0) for _ in range(50)}
    assert len(delays) > 40
    assert all(720 * 0.9 <= d <= 720 * 1.1 for d in delays)


def test_batch_limit_continues_at_once() -> None:
    decision = after_run(ScheduleState(), T0, items=500, more=True, polling=Polling(min_s=60))
    assert seconds(decision.state, T0) == Polling().continue_s
    assert "more waiting" in decision.state.why


def test_push_makes_polling_a_safety_net() -> None:
    decision = after_run(ScheduleState(), T0, items=1, polling=Polling(min_s=60, jitter=0),
                         push=True)
    assert seconds(decision.state, T0) == Polling().idle_max_s
    assert "IDLE" in decision.state.why


def test_transient_backoff_grows_exponentially_with_jitter_and_caps() -> None:
    backoff = Backoff(base_s=30, cap_s=600, alert_after=5)
    rng = random.Random(11)
    state, now, delays, alerts = ScheduleState(), T0, [], []
    for _ in range(8):
        decision = after_run(state, now, failure=transient(), backoff=backoff, rng=rng)
        state = decision.state
        delays.append(seconds(state, now))
        alerts.append(decision.alert)
        assert not decision.disable  # transient errors never disable
        assert state.backoff_until == state.next_run_at
        now = state.next_run_at or now
    steps = [30, 60, 120, 240, 480, 600, 600, 600]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step
    assert alerts == [False, False, False, False, True, False, False, False]  # warn once
    assert state.consecutive_failures == 8
    assert "8 transient failures" in state.why and "connection refused" in state.why


def test_backoff_honours_retry_after() -> None:
    decision = after_run(ScheduleState(), T0, failure=transient(retry_after=900),
                         backoff=Backoff(base_s=30), rng=random.Random(0))
    assert seconds(decision.state, T0) == 900


def test_recovery_after_transient_failures_resets_and_reports_recovered() -> None:
    state = ScheduleState()
    for _ in range(6):
        state = after_run(state, T0, failure=transient(), rng=random.Random(0)).state
    decision = after_run(state, T0 + dt.timedelta(hours=1), items=2, rng=random.Random(0))
    assert decision.recovered
    assert decision.state.consecutive_failures == 0 and decision.state.last_error is None
    assert decision.state.last_success_at == T0 + dt.timedelta(hours=1)
    assert decision.state.backoff_until is None


def test_permanent_failure_disables_with_the_fix_in_why() -> None:
    failure = Failure(Outcome.PERMANENT, "auth-failed", "login of bob was rejected",
                      "update the mailbox's secret")
    decision = after_run(ScheduleState(last_success_at=T0), T0, failure=failure)
    assert decision.disable
    assert decision.state.next_run_at is None
    assert decision.state.last_success_at == T0  # history is kept
    assert decision.state.why == "disabled: login of bob was rejected — update the mailbox's secret"


def test_sync_now_is_due_at_once_unless_backing_off() -> None:
    idle = ScheduleState(next_run_at=T0 + dt.timedelta(minutes=10))
    assert requested(idle, T0).next_run_at == T0
    backing_off = after_run(ScheduleState(), T0, failure=transient(retry_after=300)).state
    later = requested(backing_off, T0 + dt.timedelta(seconds=10))
    assert later.next_run_at == backing_off.next_run_at
    assert "waiting for the backoff" in later.why


def test_profile_rule_more_than_half() -> None:
    boxes = ["a", "b", "c", "d"]
    assert not profile_failing(["a", "b"], boxes)  # half is not more than half
    assert profile_failing(["a", "b", "c"], boxes)
    assert not profile_failing(["x", "y", "z"], boxes)  # other profiles' mailboxes
    assert not profile_failing([], [])
    assert profile_failing(["a"], ["a"])


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
