"""The scheduler and the channel runner on a real database, with a fake clock and fake jobs.

Runs on SQLite and PostgreSQL (the ``db`` fixture). The channel jobs are fakes registered in
a test `Services`, so these tests pin the runtime's behaviour — what is due, limits,
recording, backoff, disabling with alerts, recovery, the profile alert — independently of
the real incoming/outgoing/ACT jobs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from serversync import wiring
from serversync.core.errors import AuthError, TransientError
from serversync.core.model import (
    Alert,
    ApprovalStatus,
    Channel,
    ChannelState,
    ChannelStatus,
    CredentialSource,
    Endpoint,
    Mailbox,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    Severity,
    SyncMethod,
    TlsMode,
)
from serversync.core.schedule import Backoff, Outcome
from serversync.core.secret import Secret
from serversync.runtime.scheduler import Scheduler
from serversync.services import RunSummary, Services
from serversync.services.runs import ChannelRunner, RunLog
from serversync.store.db import Database

T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)


class FakeClock:
    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


Behaviour = Callable[[str], RunSummary]


@dataclass
class FakeJob:
    """Answers per address from a script of results (RunSummary or an exception)."""

    scripts: dict[str, list[RunSummary | Exception]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    delay: float = 0.0
    active: int = 0
    peak: int = 0

    async def __call__(self, address: str) -> RunSummary:
        self.calls.append(address)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            script = self.scripts.get(address, [])
            result = script.pop(0) if script else RunSummary()
            if isinstance(result, Exception):
                raise result
            return result
        finally:
            self.active -= 1


async def seed(db: Database, count: int, *, profile: str = "p", cap: int = 10,
               min_poll: int = 60, approval: ApprovalStatus = ApprovalStatus.APPROVED,
               alert_owner: str | None = None, secret: str | None = "pw") -> list[str]:
    addresses = [f"user{i}@example.test" for i in range(count)]
    async with db.transaction() as repo:
        await repo.save_profile(Profile(
            profile, ServerKind.IMAP, Endpoint("127.0.0.1", 10993, TlsMode.IMPLICIT),
            credential_source=CredentialSource.MAILBOX, min_polling_interval_s=min_poll,
            max_concurrent_connections=cap, send_alert_email=alert_owner is not None,
            alert_owner=alert_owner))
        for i, address in enumerate(addresses):
            await repo.save_party(Party(PartyKind.USER, f"u{i}", f"User {i}", (address,)))
            await repo.save_mailbox(Mailbox(
                address, PartyKind.USER, f"u{i}", profile,
                incoming=ChannelState(SyncMethod.SERVER_SIDE, True, ChannelStatus.SUCCESS),
                allow_credentials=True, username=address,
                secret=Secret(secret) if secret else None,
                approval=approval))
    return addresses


def make(db: Database, job: FakeJob, clock: FakeClock, **runner_args: object
         ) -> tuple[Services, RunLog, ChannelRunner, Scheduler]:
    services = Services(db, wiring.PROBERS, jobs={Channel.INCOMING: job}, clock=clock)
    runlog = RunLog(db, clock=clock)
    runner = ChannelRunner(services, rng=random.Random(5), **runner_args)  # type: ignore[arg-type]
    return services, runlog, runner, Scheduler(runlog, runner, max_concurrency=20)


async def test_new_channels_run_once_and_are_recorded(db: Database) -> None:
    clock, job = FakeClock(), FakeJob()
    boxes = await seed(db, 3)
    job.scripts[boxes[0]] = [RunSummary(items=4, failures=1, detail="4 tracked, 1 quarantined")]
    _, runlog, _, scheduler = make(db, job, clock)
    runs = await scheduler.run_until_idle()
    assert sorted(r.mailbox for r in runs) == boxes
    assert sorted(job.calls) == boxes
    assert await scheduler.run_until_idle() == []  # nothing due until the clock moves
    recent = await runlog.recent(mailbox=boxes[0])
    assert len(recent) == 1
    run = recent[0]
    assert (run.items, run.failures, run.outcome, run.error) == (4, 1, Outcome.SUCCESS, None)
    assert run.started_at == T0 and run.finished_at == T0 and run.detail == "4 tracked, 1 quarantined"
    schedule = (await runlog.schedules(boxes[0]))[0]
    assert schedule.last_success_at == T0 and schedule.consecutive_failures == 0
    assert schedule.next_run_at is not None and schedule.next_run_at >= T0 + dt.timedelta(seconds=60)
    assert "4 items in the last run" in schedule.why
    stats = await runlog.stats(T0 - dt.timedelta(hours=2))
    assert stats["totals"]["items"] == 4 and stats["totals"]["runs"] == 3
    assert stats["mailboxes_by_status"]["success"] == 3
    assert stats["latency_s"]["count"] == 3
    assert sum(h["items"] for h in stats["hourly"]) == 4


async def test_idle_mailbox_polls_less_often_and_sync_now_runs_it(db: Database) -> None:
    clock, job = FakeClock(), FakeJob()
    [box] = await seed(db, 1, min_poll=60)
    _, runlog, _, scheduler = make(db, job, clock)
    gaps = []
    for _ in range(5):
        await scheduler.run_until_idle()
        [schedule] = await runlog.schedules(box)
        assert schedule.next_run_at is not None
        gaps.append((schedule.next_run_at - clock.now).total_seconds())
        clock.now = schedule.next_run_at
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0] * 2
    assert len(job.calls) == 5
    assert len(await scheduler.run_until_idle()) == 1  # the clock is at the next run
    clock.advance(1)
    assert await scheduler.run_until_idle() == []
    await runlog.request_sync(box, Channel.INCOMING)
    [schedule] = await runlog.schedules(box)
    assert schedule.requested_at == clock.now and schedule.why == "sync requested"
    assert len(await scheduler.run_until_idle()) == 1
    [schedule] = await runlog.schedules(box)
    assert schedule.requested_at is None


async def test_transient_failures_back_off_alert_once_and_recover(db: Database) -> None:
    clock, job = FakeClock(), FakeJob()
    [box] = await seed(db, 1)
    job.scripts[box] = [TransientError("connection refused", code="network")] * 4 + [
        RunSummary(items=2)]
    _, runlog, _, scheduler = make(db, job, clock, backoff=Backoff(base_s=30, alert_after=3))
    services = scheduler.runner.services
    waits = []
    for attempt in range(1, 5):
        [run] = await scheduler.run_until_idle()
        assert run.outcome is Outcome.TRANSIENT and run.error_code == "network"
        [schedule] = await runlog.schedules(box)
        assert schedule.consecutive_failures == attempt and schedule.enabled
        assert schedule.next_run_at is not None
        waits.append((schedule.next_run_at - clock.now).total_seconds())
        clock.advance(waits[-1] - 1)
        assert await scheduler.run_until_idle() == []  # not before the backoff ends
        clock.advance(1)
        mailbox = await services.get_mailbox(box)
        alerts = await services.alerts(mailbox=box)
        if attempt < 3:
            assert mailbox.incoming.status is ChannelStatus.SUCCESS and not alerts
        else:
            assert mailbox.incoming.status is ChannelStatus.FAILURE
            assert len(alerts) == 1 and alerts[0].severity is Severity.WARNING  # warned once
            assert "retrying automatically" in alerts[0].message
    assert waits[3] > waits[0]
    [run] = await scheduler.run_until_idle()
    assert run.outcome is Outcome.SUCCESS
    mailbox = await services.get_mailbox(box)
    assert mailbox.incoming.enabled and mailbox.incoming.status is ChannelStatus.SUCCESS
    assert await services.alerts(mailbox=box) == []  # resolved on recovery
    [schedule] = await runlog.schedules(box)
    assert schedule.consecutive_failures == 0 and schedule.last_error is None


async def test_permanent_error_disables_with_alert_and_profile_alert(db: Database) -> None:
    clock, job = FakeClock(), FakeJob()
    boxes = await seed(db, 3, alert_owner="admin@example.test")
    for box in boxes[:2]:
        job.scripts[box] = [AuthError(f"login of {box} was rejected",
                                      fix="update the mailbox's username and secret")]
    mailed: list[tuple[str, Alert]] = []

    async def mailer(profile: Profile, alert: Alert) -> None:
        mailed.append((profile.alert_owner or "", alert))
    _, runlog, _, scheduler = make(db, job, clock, alert_mailer=mailer)
    services = scheduler.runner.services
    await scheduler.run_until_idle()
    for box in boxes[:2]:
        mailbox = await services.get_mailbox(box)
        assert not mailbox.incoming.enabled and mailbox.incoming.status is ChannelStatus.FAILURE
        [alert] = await services.alerts(mailbox=box)
        assert alert.code == "auth-failed" and alert.severity is Severity.ERROR
        assert "update the mailbox's username and secret" in alert.fix
        [schedule] = await runlog.schedules(box)
        assert schedule.why.startswith("disabled: login of")
    profile_alerts = [a for a in await services.alerts(profile="p") if a.mailbox is None]
    assert [a.code for a in profile_alerts] == ["profile-failing"]
    assert "2 of 3 mailboxes" in profile_alerts[0].message
    assert [(to, a.code) for to, a in mailed] == [("admin@example.test", "profile-failing")]
    clock.advance(3600)
    runs = await scheduler.run_until_idle()
    assert [r.mailbox for r in runs] == [boxes[2]]  # disabled channels are not retried
    stats = await runlog.stats(T0)
    assert stats["mailboxes_by_status"] == {"success": 1, "failure": 2, "not-run": 0,
                                            "disabled": 0}
    assert stats["totals"]["permanent"] == 2


async def test_unapproved_and_disabled_channels_are_not_run(db: Database) -> None:
    clock, job = FakeClock(), FakeJob()
    await seed(db, 2, approval=ApprovalStatus.PENDING)
    _, runlog, _, scheduler = make(db, job, clock)
    assert await scheduler.run_until_idle() == []
    [schedule, _] = await runlog.schedules()
    assert schedule.why.startswith("waiting for approval")


@pytest.mark.parametrize(("profile_cap", "process_cap", "peak"), [(1, 20, 1), (3, 20, 3),
                                                                     (10, 2, 2)])
async def test_profile_cap_and_process_cap(sqlite_db: Database, profile_cap: int,
                                           process_cap: int, peak: int) -> None:
    clock, job = FakeClock(), FakeJob(delay=0.05)
    await seed(sqlite_db, 8, cap=profile_cap)
    _, _, _, scheduler = make(sqlite_db, job, clock)
    scheduler.max_concurrency = process_cap
    runs = await scheduler.run_until_idle()
    assert len(runs) == 8 and len(set(job.calls)) == 8
    assert job.peak == peak == scheduler.peak


async def test_stop_lets_running_batches_finish_or_cancels_them(sqlite_db: Database) -> None:
    clock, job = FakeClock(), FakeJob(delay=0.2)
    boxes = await seed(sqlite_db, 2)
    _, runlog, _, scheduler = make(sqlite_db, job, clock)
    loop_task = asyncio.create_task(scheduler.run())
    while len(job.calls) < 2:
        await asyncio.sleep(0.01)
    await scheduler.stop(grace=5)  # enough: both finish
    await asyncio.wait_for(loop_task, 5)
    outcomes = {r.mailbox: r.outcome for r in await runlog.recent()}
    assert outcomes == dict.fromkeys(boxes, Outcome.SUCCESS)

    clock.advance(7200)
    job.delay = 30
    scheduler2 = Scheduler(runlog, scheduler.runner)
    loop_task = asyncio.create_task(scheduler2.run())
    while len(job.calls) < 4:
        await asyncio.sleep(0.01)
    await scheduler2.stop(grace=0.1)  # too short: cancelled and recorded as interrupted
    await asyncio.wait_for(loop_task, 5)
    latest = await runlog.recent(limit=2)
    assert {r.outcome for r in latest} == {Outcome.TRANSIENT}
    assert {r.error_code for r in latest} == {"interrupted"}
    assert all(r.finished_at is not None for r in latest)
