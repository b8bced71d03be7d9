"""``serversync worker``: any number of worker processes sharing one PostgreSQL.

Jobs go through **procrastinate** (a maintained PostgreSQL job queue; no home-made queue):

* ``serversync.sync_channel(address, channel)`` runs one channel of one mailbox through
  `services.runs.ChannelRunner`. It is deferred with ``lock`` and ``queueing_lock`` both set
  to ``"<address>/<channel>"``: procrastinate never runs two jobs with the same lock at
  once, and keeps at most one waiting, so a channel never runs twice at once on any number
  of machines and "sync now" pressed ten times queues one job.
* ``serversync.dispatch`` (periodic, every ``dispatch_s`` seconds; procrastinate makes sure
  one worker defers each tick) defers a job for every due channel, and hands the jobs of
  dead workers (no heartbeat for ``stalled_s``) back to the queue: the channel's lock is
  released and another worker takes the channel over. The killed worker's uncommitted batch
  rolled back with its connection; its committed batches moved the cursor, so the new run
  continues from there — nothing is lost or duplicated. Its open run is closed as
  "interrupted" by the next run.
* ``serversync.webhooks`` (periodic) delivers webhooks; ``serversync.prune`` (hourly)
  forgets old runs; ``serversync.graph_subscriptions`` (every 15 minutes, when
  ``graph_notification_url`` is set) creates, renews and deletes Microsoft Graph
  subscriptions (`services.graph_subscriptions`); their notifications reach the web app
  (`web.graph_notify`), which makes the channel due for ``dispatch``.

Push: each worker runs `runtime.push.Push` with `PushClaims` — PostgreSQL session advisory
locks on one connection per worker — so each IMAP IDLE connection lives in exactly one
worker, spread evenly over the live workers (procrastinate's worker heartbeats count them);
when a worker dies its connection and its locks go, and the others claim its mailboxes at
their next rescan. A push notification defers the channel's job at once.

Shutdown (SIGINT/SIGTERM): procrastinate stops fetching, gives running jobs
``grace_s`` to finish, then cancels them; a cancelled job rolls back and is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import procrastinate
import psycopg
from procrastinate.exceptions import AlreadyEnqueued, UniqueViolation
from procrastinate.jobs import Status
from procrastinate.schema import SchemaManager

from serversync.core.errors import ConfigError
from serversync.core.model import Channel, ServerKind
from serversync.runtime.local import close_jobs
from serversync.runtime.push import Push, Watch
from serversync.services import Services
from serversync.services.graph_subscriptions import GraphSubscriptions
from serversync.services.runs import AlertMailer, ChannelRunner, RunLog, worker_name
from serversync.services.webhooks import Webhooks

log = logging.getLogger("serversync.worker")

QUEUE = "sync"
SCHEMA_LOCK = 0x5E5E_0001  # advisory lock key while installing procrastinate's schema


@dataclass
class WorkerOptions:
    concurrency: int = 20  # jobs at once in this worker
    dispatch_s: int = 2
    stalled_s: float = 30.0  # a worker silent this long is dead; its jobs are retried
    heartbeat_s: float = 10.0
    grace_s: float = 30.0
    push: bool = True
    rescan_s: float = 30.0
    connect_concurrency: int = 20
    graph_notification_url: str | None = None  # set: keep Graph subscriptions (push)


def conninfo(database_url: str) -> str:
    """The libpq form of the settings' URL (procrastinate and psycopg speak libpq)."""
    if not database_url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        raise ConfigError("SERVERSYNC_DATABASE_URL",
                          "workers share work through PostgreSQL; this is not a PostgreSQL URL",
                          fix="set SERVERSYNC_DATABASE_URL=postgresql://user@host/db, or run "
                              "`serversync serve` for the single-process SQLite setup")
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


DISPATCH_BATCH = 500  # channels deferred per INSERT by ``dispatch``


def channel_lock(address: str, channel: Channel) -> str:
    return f"{address}/{channel.value}"


async def install_schema(dsn: str) -> None:
    """Install procrastinate's tables once (idempotent, safe with many workers starting)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            found = await (await conn.execute(
                "SELECT to_regclass('procrastinate_jobs') IS NOT NULL")).fetchone()
            if found and not found[0]:
                await conn.execute(SchemaManager.get_schema())
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


class PushClaims:
    """Which mailboxes this worker watches: advisory locks held on one connection."""

    def __init__(self, dsn: str, stalled_s: float) -> None:
        self.dsn = dsn
        self.stalled_s = stalled_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self._conn

    async def share(self, total: int) -> int:
        async with self._lock:
            conn = await self._connection()
            row = await (await conn.execute(
                "SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > "
                "now() - make_interval(secs => %s)", (self.stalled_s,))).fetchone()
        live = max(1, int(row[0]) if row else 1)
        return math.ceil(total / live)

    async def claim(self, address: str) -> bool:
        async with self._lock:
            conn = await self._connection()
            row = await (await conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                (f"serversync-push:{address}",))).fetchone()
        return bool(row and row[0])

    async def release(self, address: str) -> None:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                return
            await self._conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                                     (f"serversync-push:{address}",))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class Worker:
    """One worker process: procrastinate's worker, its tasks, and the push watchers."""

    def __init__(self, services: Services, database_url: str, *,
                 options: WorkerOptions | None = None,
                 pushers: Mapping[ServerKind, Watch] | None = None,
                 alert_mailer: AlertMailer | None = None) -> None:
        self.services = services
        self.options = options or WorkerOptions()
        self.dsn = conninfo(database_url)
        self.runlog = RunLog(services.db, clock=services.clock)
        self.claims = PushClaims(self.dsn, self.options.stalled_s)
        self.push: Push | None = None
        if self.options.push and pushers:
            self.push = Push(services, pushers, self._pushed, claims=self.claims,
                             rescan_s=self.options.rescan_s,
                             connect_concurrency=self.options.connect_concurrency)
        self.runner = ChannelRunner(services, push=self.push.covers if self.push else None,
                                    alert_mailer=alert_mailer, worker=worker_name())
        self.webhooks = Webhooks(services.db, services.clock)
        self.graph_subscriptions = GraphSubscriptions(services.db, services.clock)
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=self.dsn))
        self._register()

    def _register(self) -> None:
        app, runner, options = self.app, self.runner, self.options

        @app.task(name="serversync.sync_channel", queue=QUEUE,
                  retry=procrastinate.RetryStrategy(max_attempts=5, exponential_wait=2))
        async def sync_channel(address: str, channel: str) -> None:
            await runner.run(address, Channel(channel), only_if_due=True)

        @app.periodic(cron=f"*/{max(1, options.dispatch_s)} * * * * *")
        @app.task(name="serversync.dispatch", queue=QUEUE, queueing_lock="serversync.dispatch")
        async def dispatch(timestamp: int) -> None:
            await self.dispatch()

        @app.periodic(cron="*/5 * * * * *")
        @app.task(name="serversync.webhooks", queue=QUEUE, queueing_lock="serversync.webhooks",
                  lock="serversync.webhooks")
        async def webhooks(timestamp: int) -> None:
            await self.webhooks.deliver_pending()

        @app.periodic(cron="17 * * * *")
        @app.task(name="serversync.prune", queue=QUEUE, queueing_lock="serversync.prune")
        async def prune(timestamp: int) -> None:
            await self.runlog.prune()
            await self.app.job_manager.delete_old_jobs(nb_hours=24, include_failed=True)

        @app.periodic(cron="*/15 * * * *")
        @app.task(name="serversync.graph_subscriptions", queue=QUEUE,
                  queueing_lock="serversync.graph_subscriptions",
                  lock="serversync.graph_subscriptions")
        async def graph_subscriptions(timestamp: int) -> None:
            # Without a public notification URL nothing subscribes: delta polling only.
            if options.graph_notification_url:
                await self.graph_subscriptions.ensure(options.graph_notification_url)

        self.sync_task = sync_channel

    async def defer(self, address: str, channel: Channel) -> bool:
        """Queue one run of a channel; False when one is already waiting."""
        lock = channel_lock(address, channel)
        try:
            await self.sync_task.configure(lock=lock, queueing_lock=lock).defer_async(
                address=address, channel=channel.value)
        except AlreadyEnqueued:
            return False
        return True

    async def dispatch(self) -> int:
        """Hand dead workers' jobs back, then queue every due channel."""
        for job in await self.app.job_manager.get_stalled_jobs(
                seconds_since_heartbeat=self.options.stalled_s):
            log.warning("worker of job %s (%s) is gone; handing it over", job.id, job.lock)
            try:
                await self.app.job_manager.retry_job(job)
            except UniqueViolation:
                # A run of the same channel is already queued (queueing lock) and covers
                # this one: close the dead job so that its lock no longer blocks it.
                await self.app.job_manager.finish_job(job, Status.FAILED, delete_job=False)
        due = await self.runlog.due(limit=5000)
        if not due:
            return 0
        # One INSERT per 500 channels instead of one per channel (a 1,000-mailbox cycle
        # waited on a thousand round trips, every 2 s). Channels whose job still waits are
        # left out first: their queueing lock would refuse the whole batch.
        rows = await self.app.connector.execute_query_all_async(
            "SELECT queueing_lock FROM procrastinate_jobs WHERE status = 'todo' "
            "AND queue_name = %(queue)s AND queueing_lock IS NOT NULL", queue=QUEUE)
        waiting = {row["queueing_lock"] for row in rows}
        fresh = [d for d in due if channel_lock(d.mailbox, d.channel) not in waiting]
        queued = 0
        for start in range(0, len(fresh), DISPATCH_BATCH):
            chunk = fresh[start:start + DISPATCH_BATCH]
            jobs = []
            for d in chunk:
                lock = channel_lock(d.mailbox, d.channel)
                jobs.append(self.sync_task.configure(lock=lock, queueing_lock=lock)
                            .make_new_job(address=d.mailbox, channel=d.channel.value))
            try:
                await self.app.job_manager.batch_defer_jobs_async(jobs)
                queued += len(jobs)
            except AlreadyEnqueued:  # one was queued meanwhile (a push): one at a time
                for d in chunk:
                    queued += await self.defer(d.mailbox, d.channel)
        return queued

    async def _pushed(self, address: str, channel: Channel) -> None:
        await self.runlog.request_sync(address, channel)
        await self.defer(address, channel)

    async def run(self) -> None:
        """Work until cancelled or signalled (procrastinate installs SIGINT/SIGTERM)."""
        await install_schema(self.dsn)
        push_task = None
        async with self.app.open_async():
            if self.push is not None:
                push_task = asyncio.create_task(self.push.run(), name="push")
            try:
                await self.app.run_worker_async(
                    queues=[QUEUE], concurrency=self.options.concurrency, name=worker_name(),
                    shutdown_graceful_timeout=self.options.grace_s,
                    update_heartbeat_interval=self.options.heartbeat_s,
                    stalled_worker_timeout=self.options.stalled_s,
                    delete_jobs="successful", install_signal_handlers=True)
            finally:
                if push_task is not None and self.push is not None:
                    await self.push.stop()
                    push_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await push_task
                await self.claims.close()
                await close_jobs(self.services)
