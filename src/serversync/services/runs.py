"""Sync runs, schedules and health: the use cases behind the runtime, the API and the UI.

`RunLog` is what the web layer reads: recent runs, each channel's schedule (last success,
next run and why), "sync now", and the dashboard's statistics. `ChannelRunner` is what the
runtime calls to run one channel of one mailbox once: it records the run, asks
`core.schedule.after_run` what comes next, and applies the decision — status, backoff,
disabling the channel with an alert on a permanent error, resolving alerts on recovery, and
the profile-level alert when more than half of a profile's mailboxes fail within an hour
(``dynamics-sss.md`` §4.1; ``core.schedule`` documents the rules and numbers).

Every write is one short transaction; the channel job itself runs between two of them, in
its own transactions, so a run that is interrupted leaves an open run row that the next run
of the channel closes as "interrupted". A no-change run is two transactions and nine
statements: read the mailbox, settings, profile and schedule, open the run (and let the
job read what it needs first, `ChannelJob.prefetch`), then close it (docs/benchmarks.md,
"Scale").
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import (
    Alert,
    ApprovalStatus,
    Channel,
    ChannelStatus,
    Mailbox,
    Profile,
    Severity,
    SyncMethod,
)
from serversync.core.schedule import (
    Backoff,
    ChannelSchedule,
    Failure,
    Outcome,
    Polling,
    Run,
    ScheduleState,
    after_run,
    classify,
    percentile,
    profile_failing,
    requested,
)
from serversync.core.webhooks import Event
from serversync.services.admin import Clock, Services, utcnow
from serversync.services.channels import RunContext, RunSummary, current_run
from serversync.services.webhooks import emit
from serversync.store.db import Database
from serversync.store.runs import DueChannel, RunStore

__all__ = ["AlertMailer", "ChannelRunner", "ChannelSchedule", "DueChannel", "Outcome",
           "Run", "RunLog", "worker_name"]

log = logging.getLogger("serversync.runs")

# Sends a profile-level alert to the profile's alert_owner (see `ChannelRunner`).
AlertMailer = Callable[[Profile, Alert], Awaitable[None]]
# Called after a "sync now" request, so that a scheduler in this process wakes at once.
Waker = Callable[[str, Channel], None]

PROFILE_ALERT = "profile-failing"
PROFILE_WINDOW = dt.timedelta(hours=1)
IDLE_MAX_S = Polling().idle_max_s


def worker_name() -> str:
    """Who runs a job, for the runs table: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RunLog:
    """Reads of runs and schedules, and "sync now"."""

    def __init__(self, db: Database, clock: Clock = utcnow) -> None:
        self.db = db
        self.clock = clock
        self.wakers: list[Waker] = []

    async def recent(self, *, mailbox: str | None = None, limit: int = 100) -> list[Run]:
        """The latest runs, newest first (of one mailbox, or of all)."""
        async with self.db.transaction() as repo:
            if mailbox is not None:
                await repo.get_mailbox(mailbox)  # NotFound for an unknown address
            return await RunStore(repo.session).recent(mailbox=mailbox, limit=limit)

    async def schedules(self, mailbox: str | None = None) -> list[ChannelSchedule]:
        """Each server-side channel: enabled, status, last success, next run and why."""
        async with self.db.transaction() as repo:
            if mailbox is not None:
                await repo.get_mailbox(mailbox)
            return await RunStore(repo.session).schedules(mailbox)

    async def request_sync(self, address: str, channel: Channel) -> None:
        """"Sync now": the channel is due at once (a server-imposed backoff still holds)."""
        now = self.clock()
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            if mailbox.channel(channel).method is not SyncMethod.SERVER_SIDE:
                raise RuleViolation(
                    f"{channel.value} of {mailbox.address} is not synced (method none)",
                    fix=f"set {channel.value} to server-side and run Test & Enable",
                    code="channel-off")
            if not mailbox.channel(channel).enabled:
                raise RuleViolation(
                    f"{channel.value} of {mailbox.address} is disabled",
                    fix="run Test & Enable (it enables the channel once the test passes)",
                    code="channel-disabled")
            store = RunStore(repo.session)
            state = requested(await store.state(mailbox.address, channel), now)
            await store.request(mailbox.address, channel, now, state)
        for wake in list(self.wakers):
            wake(mailbox.address, channel)

    async def stats(self, since: dt.datetime) -> dict[str, Any]:
        """Dashboard and Prometheus figures since ``since``.

        ``hourly``: items processed, item failures, runs and failed runs per hour (UTC);
        ``mailboxes_by_status``: success / failure / not-run / disabled; ``latency_s``:
        percentiles of sync run duration (start to finish) — the delay between a run being
        due or requested and its result; ``totals`` over the whole window; ``running`` runs
        in progress.
        """
        now = self.clock()
        async with self.db.transaction() as repo:
            store = RunStore(repo.session)
            runs = await store.runs_since(since)
            statuses = await store.mailbox_statuses()
        hourly: dict[dt.datetime, dict[str, Any]] = {}
        hour = since.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
        while hour <= now:
            hourly[hour] = {"hour": hour.isoformat(), "items": 0, "failures": 0, "runs": 0,
                            "failed_runs": 0}
            hour += dt.timedelta(hours=1)
        durations: list[float] = []
        totals = {"runs": 0, "items": 0, "failures": 0, "success": 0, "transient": 0,
                  "permanent": 0, "running": 0}
        by_channel: dict[str, dict[str, int]] = {
            c.value: {"runs": 0, "items": 0, "failures": 0, "failed_runs": 0} for c in Channel}
        for run in runs:
            totals["runs"] += 1
            if run.outcome is None:
                totals["running"] += 1
                continue
            totals[run.outcome.value] += 1
            totals["items"] += run.items
            totals["failures"] += run.failures
            bucket_key = run.started_at.replace(minute=0, second=0, microsecond=0)
            bucket = hourly.setdefault(bucket_key, {
                "hour": bucket_key.isoformat(), "items": 0, "failures": 0, "runs": 0,
                "failed_runs": 0})
            bucket["items"] += run.items
            bucket["failures"] += run.failures
            bucket["runs"] += 1
            failed = run.outcome is not Outcome.SUCCESS
            bucket["failed_runs"] += int(failed)
            channel_totals = by_channel[run.channel.value]
            channel_totals["runs"] += 1
            channel_totals["items"] += run.items
            channel_totals["failures"] += run.failures
            channel_totals["failed_runs"] += int(failed)
            if run.seconds is not None:
                durations.append(run.seconds)
        return {
            "since": since.isoformat(), "until": now.isoformat(),
            "hourly": [hourly[k] for k in sorted(hourly)],
            "mailboxes_by_status": statuses,
            "latency_s": {"count": len(durations),
                          "p50": percentile(durations, 50), "p90": percentile(durations, 90),
                          "p99": percentile(durations, 99),
                          "max": max(durations) if durations else None},
            "totals": totals,
            "by_channel": by_channel,
        }

    async def due(self, *, limit: int = 1000,
                  exclude: set[tuple[str, Channel]] | None = None) -> list[DueChannel]:
        """Channels due now (for the schedulers)."""
        async with self.db.transaction() as repo:
            approved_only = (await repo.get_settings()).process_only_approved_mailboxes
            return await RunStore(repo.session).due(self.clock(), approved_only=approved_only,
                                                    limit=limit, exclude=exclude)

    async def next_due_at(self) -> dt.datetime | None:
        async with self.db.transaction() as repo:
            approved_only = (await repo.get_settings()).process_only_approved_mailboxes
            return await RunStore(repo.session).next_due_at(approved_only=approved_only)

    async def prune(self, keep: dt.timedelta = dt.timedelta(days=14)) -> int:
        async with self.db.transaction() as repo:
            return await RunStore(repo.session).prune(self.clock() - keep)


class ChannelRunner:
    """Runs one channel of one mailbox once and records everything about it.

    ``push`` tells whether an IMAP IDLE watcher covers a channel (polling is then only a
    safety net); ``alert_mailer`` emails profile-level alerts when the profile asks for it.
    """

    def __init__(self, services: Services, *, clock: Clock | None = None,
                 rng: random.Random | None = None, backoff: Backoff | None = None,
                 push: Callable[[str, Channel], bool] | None = None,
                 alert_mailer: AlertMailer | None = None, worker: str | None = None,
                 idle_max_s: float = IDLE_MAX_S) -> None:
        self.services = services
        self.db = services.db
        self.clock = clock or services.clock
        self.rng = rng or random.Random()
        self.backoff = backoff or Backoff()
        self.push = push
        self.alert_mailer = alert_mailer
        self.worker = worker or worker_name()
        self.idle_max_s = idle_max_s

    async def run(self, address: str, channel: Channel, *, only_if_due: bool = False
                  ) -> Run | None:
        """Run now; None when the channel is not runnable (disabled, not approved, gone).

        ``only_if_due`` skips a channel whose next run is still ahead: a job queued while
        the channel was running (workers) must not poll again right after that run.
        """
        started = self.clock()
        prefetch = getattr(self.services.jobs.get(channel), "prefetch", None)
        async with self.db.transaction() as repo:
            mailbox = await repo.find_mailbox(address)
            if mailbox is None or mailbox.id is None:
                return None
            state_of = mailbox.channel(channel)
            settings = await repo.get_settings()
            if (state_of.method is not SyncMethod.SERVER_SIDE or not state_of.enabled
                    or (settings.process_only_approved_mailboxes
                        and mailbox.approval is not ApprovalStatus.APPROVED)):
                return None
            profile = await repo.get_profile(mailbox.profile)
            store = RunStore(repo.session)
            schedule = await store.schedule(mailbox.id, channel)
            if only_if_due and schedule.state.next_run_at is not None \
                    and schedule.state.next_run_at > started:
                return None
            run_id = await store.open_run(mailbox.id, channel, schedule, started, self.worker)
            # what the job would read first, read here: one transaction less per run
            prefetched = await prefetch(repo, mailbox) if prefetch is not None else None
        opened = Run(run_id, mailbox.address, channel, started, None, 0, 0, None, None, None,
                     worker=self.worker[:100])
        summary: RunSummary | None = None
        failure: Failure | None = None
        token = current_run.set(RunContext(mailbox, profile, settings, prefetched))
        try:
            summary = await self.services.run_channel(mailbox.address, channel)
        except asyncio.CancelledError:
            # Shutdown or a lost lease: the job's open transaction rolled back; say so.
            await asyncio.shield(self._finish(
                opened, mailbox, profile, schedule.state, None,
                Failure(Outcome.TRANSIENT, "interrupted",
                        "the run was stopped before it finished (shutdown); its uncommitted "
                        "batch rolled back and is synced again")))
            raise
        except Exception as exc:
            failure = classify(exc)
            log.warning("%s sync of %s failed: %s", channel.value, mailbox.address,
                        failure.message)
        finally:
            current_run.reset(token)
        return await self._finish(opened, mailbox, profile, schedule.state, summary, failure)

    async def _finish(self, opened: Run, mailbox: Mailbox, profile: Profile,
                      state: ScheduleState, summary: RunSummary | None,
                      failure: Failure | None) -> Run:
        """Record the outcome.

        ``mailbox`` and the schedule ``state`` as read when the run opened, not read again:
        the channel's status and its schedule's counters (failures, idle runs, backoff) are
        changed only by runs, and one channel never runs twice at once (the scheduler in
        `serve`, procrastinate's channel lock with workers). A "sync now" meanwhile changes
        only ``next_run_at`` and ``why``, which the next state replaces anyway. On a
        no-change run this is one transaction of two UPDATE statements.
        """
        address, channel = mailbox.address, opened.channel
        assert mailbox.id is not None
        now = self.clock()
        polling = Polling(min_s=float(profile.min_polling_interval_s),
                          idle_max_s=max(self.idle_max_s, float(profile.min_polling_interval_s)))
        push = bool(self.push and self.push(address, channel))
        items = summary.items if summary else 0
        decision = after_run(state, now, items=items, more=bool(summary and summary.more),
                             failure=failure, polling=polling, backoff=self.backoff,
                             rng=self.rng, push=push)
        new_state = decision.state
        run = dataclasses.replace(
            opened, finished_at=now, items=items, failures=summary.failures if summary else 0,
            outcome=failure.outcome if failure else Outcome.SUCCESS,
            error_code=failure.code if failure else None,
            error=failure.message if failure else None,
            detail=(summary.detail if summary else (failure.fix if failure else ""))[:2000])
        async with self.db.transaction() as repo:
            store = RunStore(repo.session)
            try:
                await store.close_run(run, mailbox.id, new_state)
            except NotFound:  # deleted while it ran: nothing left to record against
                raise NotFound(f"mailbox {address} was deleted during its sync run") from None
            if failure is not None:
                await emit(repo, Event.RUN_FAILED, {
                    "run": run.id, "mailbox": address, "profile": profile.name,
                    "channel": channel.value, "outcome": failure.outcome.value,
                    "code": failure.code, "error": failure.message, "fix": failure.fix,
                    "consecutive_failures": new_state.consecutive_failures,
                    "disabled": decision.disable, "started_at": run.started_at.isoformat(),
                    "finished_at": now.isoformat()}, key=f"run:{run.id}", now=now)
            current = mailbox.channel(channel)
            if failure is None:
                if current.status is not ChannelStatus.SUCCESS:
                    await repo.set_channel(address, channel, status=ChannelStatus.SUCCESS)
                if decision.recovered or current.status is ChannelStatus.FAILURE:
                    await repo.resolve_alerts(address, channel)
            elif decision.disable:
                await repo.set_channel(address, channel, enabled=False,
                                       status=ChannelStatus.FAILURE)
                await repo.add_alert(Alert(
                    Severity.ERROR, failure.code,
                    f"{channel.value} sync of {address} is disabled: {failure.message}",
                    failure.fix or "fix the cause, then run Test & Enable",
                    mailbox=address, profile=profile.name, channel=channel, created_at=now))
            elif decision.alert:
                await repo.set_channel(address, channel, status=ChannelStatus.FAILURE)
                await repo.add_alert(Alert(
                    Severity.WARNING, failure.code,
                    f"{channel.value} sync of {address} failed {new_state.consecutive_failures} "
                    f"times in a row: {failure.message}; retrying automatically with backoff",
                    failure.fix or "check that the server is reachable and healthy",
                    mailbox=address, profile=profile.name, channel=channel, created_at=now))
            profile_alert = (await self._profile_alert(repo, store, profile, now)
                             if failure is not None else None)
        if profile_alert is not None and self.alert_mailer is not None \
                and profile.send_alert_email and profile.alert_owner:
            try:
                await self.alert_mailer(profile, profile_alert)
            except Exception as exc:  # the alert is on the wall already; mail is a courtesy
                log.warning("could not email the alert for profile %s to its owner: %s",
                            profile.name, exc)
        return run

    async def _profile_alert(self, repo: Any, store: RunStore, profile: Profile,
                             now: dt.datetime) -> Alert | None:
        """Raise the profile alert when more than half its mailboxes failed within an hour.

        Runs of one profile's mailboxes finish concurrently: without the lock two failing
        runs on PostgreSQL (READ COMMITTED) each count only their own failure, and the
        alert is never raised. Locked, the second waits and then counts the first.
        """
        await repo.lock_profile(profile.name)
        mailboxes = [m.address for m in await repo.list_mailboxes(profile.name)
                     if any(m.channel(c).method is SyncMethod.SERVER_SIDE for c in Channel)]
        failed = await store.failed_mailboxes(profile.name, now - PROFILE_WINDOW)
        if not profile_failing(failed, mailboxes):
            return None
        open_alerts = await repo.list_alerts(profile=profile.name)
        if any(a.code == PROFILE_ALERT and a.mailbox is None
               and now - a.created_at < dt.timedelta(hours=24) for a in open_alerts):
            return None  # said already; once a day is enough
        alert = Alert(
            Severity.ERROR, PROFILE_ALERT,
            f"{len(set(failed) & set(mailboxes))} of {len(mailboxes)} mailboxes of profile "
            f"{profile.name} failed to sync within the last hour",
            "this is usually the profile, not the mailboxes: check the server, the service "
            "account's password and rights, and the profile's connection settings",
            profile=profile.name, created_at=now)
        stored: Alert = await repo.add_alert(alert)
        return stored

