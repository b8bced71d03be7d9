"""When each mailbox channel runs next, and why: adaptive polling, backoff, health rules.

Pure functions over plain values, with the clock and the random source passed in, so every
rule is tested with a fake clock. The runtime (`runtime.scheduler`, `runtime.worker`) asks
`after_run` what to do after each sync run and stores the returned `ScheduleState`.

The behaviour follows the reference system (``dynamics-sss.md`` §3.1 and §4.1) where it is
sound and departs from it where its users hurt (``peers.md`` §10–11):

* **Adaptive polling.** The reference postpones a busy mailbox 2 minutes and an idle one up
  to 12; it counts empty cycles (``noemailcount``) to decide. We do the same with our own
  numbers: the profile's ``min_polling_interval_s`` while mail flows, growing by
  `Polling.growth` per empty run up to `Polling.idle_max_s`, never below the minimum. A run
  that hit its batch limit (``RunSummary.more``) continues the same cycle almost at once:
  that is not a new poll, so the minimum interval does not apply to it.
* **Jitter.** Every delay is spread by ±`Polling.jitter` so that a thousand mailboxes
  enabled together do not poll the server in lock-step (EmailEngine's login stagger).
* **Backoff.** A transient failure waits ``base · 2^(n-1)`` seconds (capped), with "equal
  jitter" (half fixed, half random), and never less than the server's ``retry_after``. Unlike
  the reference (10 retries, then disable), a transient failure never disables a channel:
  after `Backoff.alert_after` failures in a row it is shown as failing with a warning, keeps
  retrying at the cap, and heals itself when the server comes back.
* **Permanent errors** (authentication, permission, impersonation refused, TLS trust,
  configuration) disable the channel at once with an alert that says what to fix.
* **Profile alert.** More than half of a profile's mailboxes failing within an hour is
  almost always the profile (its service account, its server), not the mailboxes: one alert
  for the profile says so.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from serversync.core.errors import (
    ConfigError,
    NotFound,
    PermanentError,
    RuleViolation,
    SyncError,
    TransientError,
)
from serversync.core.model import Channel, ChannelStatus


class Outcome(enum.StrEnum):
    """How a sync run ended."""

    SUCCESS = "success"
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # disabled until an administrator acts


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified failure: what the runtime records, shows and alerts about."""

    outcome: Outcome
    code: str
    message: str
    fix: str = ""
    retry_after: float | None = None


def classify(exc: BaseException) -> Failure:
    """Decide transient or permanent for anything a channel job raised.

    Typed errors carry their own answer. Configuration problems and rule violations need an
    administrator, so they are permanent. Network trouble the connector did not translate is
    transient. Anything else is a bug: it is retried with backoff (an upgrade may fix it) and
    alerted about after a few failures, never silently dropped.
    """
    if isinstance(exc, TransientError):
        return Failure(Outcome.TRANSIENT, exc.code, exc.message, exc.fix, exc.retry_after)
    if isinstance(exc, PermanentError | ConfigError | RuleViolation | NotFound):
        return Failure(Outcome.PERMANENT, exc.code, exc.message, exc.fix)
    if isinstance(exc, SyncError):
        return Failure(Outcome.TRANSIENT, exc.code, exc.message, exc.fix)
    if isinstance(exc, TimeoutError):
        return Failure(Outcome.TRANSIENT, "timeout", "the sync run took too long",
                       "check the server and the profile's connection timeout")
    if isinstance(exc, OSError):
        return Failure(Outcome.TRANSIENT, "network", f"network error: {exc.strerror or exc}",
                       "check that the server is reachable")
    return Failure(Outcome.TRANSIENT, "internal", f"internal error: {type(exc).__name__}",
                   "set SERVERSYNC_DEBUG=1, look at the log and report it")


@dataclass(frozen=True, slots=True)
class Polling:
    """Adaptive polling for one channel. ``min_s`` comes from the profile."""

    min_s: float = 60.0
    idle_max_s: float = 12 * 60.0  # the reference's idle ceiling
    growth: float = 1.5  # per empty run
    jitter: float = 0.1  # ±10 %
    continue_s: float = 1.0  # after a run that hit its batch limit (``more``)

    def interval(self, idle_runs: int) -> float:
        """The base delay after ``idle_runs`` empty runs in a row (0 = mail is flowing)."""
        ceiling = max(self.min_s, self.idle_max_s)
        return min(ceiling, self.min_s * float(self.growth ** max(0, idle_runs)))


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 30.0
    cap_s: float = 30 * 60.0
    alert_after: int = 5  # transient failures in a row before the channel shows as failing

    def delay(self, failures: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Equal jitter: half the exponential step fixed, half random; at least retry_after."""
        step = min(self.cap_s, self.base_s * float(2 ** max(0, failures - 1)))
        delay = step / 2 + rng.uniform(0, step / 2)
        if retry_after is not None and retry_after > delay:
            delay = float(retry_after)
        return delay


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """Everything the scheduler keeps about one mailbox channel between runs."""

    next_run_at: dt.datetime | None = None  # None = due now (never run)
    last_run_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None
    consecutive_failures: int = 0  # transient failures in a row
    idle_runs: int = 0  # successful runs in a row that found nothing
    backoff_until: dt.datetime | None = None
    last_error_code: str | None = None
    last_error: str | None = None
    why: str = "never run: due now"


@dataclass(frozen=True, slots=True)
class Decision:
    """What `after_run` decided: the new state and what the runtime must do about it."""

    state: ScheduleState
    disable: bool = False  # permanent failure: disable the channel, alert
    alert: bool = False  # transient failures reached the alert threshold (warn once)
    recovered: bool = False  # success after failures: resolve alerts, status back to success


def _spread(seconds: float, fraction: float, rng: random.Random) -> float:
    return max(0.0, seconds * (1 + rng.uniform(-fraction, fraction)))


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def after_run(state: ScheduleState, now: dt.datetime, *, items: int = 0, more: bool = False,
              failure: Failure | None = None, polling: Polling = Polling(),
              backoff: Backoff = Backoff(), rng: random.Random | None = None,
              push: bool = False) -> Decision:
    """The next state of a channel after one run that ended at ``now``.

    ``push`` says an IMAP IDLE watcher covers the channel: polling is only the safety net
    then, so it waits the idle ceiling, and the reason shown says so.
    """
    rng = rng or random.Random()
    if failure is None:
        recovered = state.consecutive_failures >= backoff.alert_after or (
            state.consecutive_failures > 0 and state.last_error_code is not None)
        idle_runs = 0 if (items or more) else state.idle_runs + 1
        if more:
            delay, why = polling.continue_s, f"{items} items synced, more waiting: continuing"
        elif push:
            delay = _spread(max(polling.min_s, polling.idle_max_s), polling.jitter, rng)
            why = f"IMAP IDLE push is on; safety-net poll in {_human(delay)}"
        else:
            delay = _spread(polling.interval(idle_runs), polling.jitter, rng)
            delay = max(delay, polling.min_s)
            why = (f"{items} items in the last run: polling every {_human(delay)}" if items
                   else f"idle for {idle_runs} run{'s' if idle_runs != 1 else ''}: "
                        f"next poll in {_human(delay)}")
        new = ScheduleState(next_run_at=now + dt.timedelta(seconds=delay), last_run_at=now,
                            last_success_at=now, consecutive_failures=0, idle_runs=idle_runs,
                            backoff_until=None, last_error_code=None, last_error=None, why=why)
        return Decision(new, recovered=recovered)
    if failure.outcome is Outcome.PERMANENT:
        why = f"disabled: {failure.message}" + (f" — {failure.fix}" if failure.fix else "")
        new = dataclasses.replace(state, next_run_at=None, last_run_at=now, backoff_until=None,
                                  last_error_code=failure.code, last_error=failure.message,
                                  why=why)
        return Decision(new, disable=True)
    failures = state.consecutive_failures + 1
    delay = backoff.delay(failures, rng, failure.retry_after)
    until = now + dt.timedelta(seconds=delay)
    why = (f"backing off after {failures} transient failure{'s' if failures != 1 else ''} "
           f"({failure.message}); retry in {_human(delay)}")
    new = dataclasses.replace(state, next_run_at=until, last_run_at=now,
                              consecutive_failures=failures, backoff_until=until,
                              last_error_code=failure.code, last_error=failure.message, why=why)
    return Decision(new, alert=failures == backoff.alert_after)


def requested(state: ScheduleState, now: dt.datetime, reason: str = "sync requested") -> ScheduleState:
    """A "sync now" (button, API or push): due at once, unless the server asked us to wait.

    A backoff window that came from the server's retry-after or from repeated failures is
    kept: hammering a failing server because new mail arrived would not help it recover.
    """
    if state.backoff_until is not None and state.backoff_until > now:
        return dataclasses.replace(state, why=f"{reason}; waiting for the backoff to end")
    return dataclasses.replace(state, next_run_at=now, why=reason)


def profile_failing(failed_within_hour: Iterable[str], mailboxes: Iterable[str]) -> bool:
    """The profile rule: more than half of a profile's active mailboxes failed within an hour.

    ``failed_within_hour`` are the mailboxes with a failed run in the last hour,
    ``mailboxes`` the profile's mailboxes with at least one enabled channel. Two mailboxes out
    of three is a profile problem; one out of two is not yet.
    """
    active = set(mailboxes)
    failed = set(failed_within_hour) & active
    return bool(active) and len(failed) * 2 > len(active)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0–100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Run:
    """One recorded sync run of one mailbox channel. ``outcome`` is None while it runs."""

    id: int
    mailbox: str
    channel: Channel
    started_at: dt.datetime
    finished_at: dt.datetime | None
    items: int
    failures: int
    outcome: Outcome | None
    error_code: str | None
    error: str | None
    detail: str = ""
    worker: str = ""

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class ChannelSchedule:
    """What an administrator sees for one mailbox channel: last success, next run and why."""

    mailbox: str
    channel: Channel
    next_run_at: dt.datetime | None
    last_success_at: dt.datetime | None
    last_error: str | None
    consecutive_failures: int
    why: str
    profile: str = ""
    enabled: bool = False
    status: ChannelStatus = ChannelStatus.NOT_RUN
    last_run_at: dt.datetime | None = None
    last_error_code: str | None = None
    backoff_until: dt.datetime | None = None
    requested_at: dt.datetime | None = None
    running_since: dt.datetime | None = None
