"""The in-process scheduler: which mailbox channels are due, and running them within limits.

One asyncio loop asks the store what is due (`services.runs.RunLog.due`: enabled, approved
channels whose ``next_run_at`` has come, "sync now" requests, channels that never ran),
starts each as a task through `services.runs.ChannelRunner` — which records the run and
computes the next one with `core.schedule` — and sleeps until the next channel is due or
until something wakes it (a "sync now" or an IMAP IDLE push, `wake`).

Limits: a channel never runs twice at once in this process; at most the profile's
``max_concurrent_connections`` runs of one profile at once (the reference's per-profile
cap, which protects the mail server); at most ``max_concurrency`` runs in the process (which
protects this machine and the database). Work over a limit stays due and starts as soon as
a slot frees. The scheduler is for one process (``serversync serve``); many processes share
work through `runtime.worker` instead.

Shutdown (`stop`) starts nothing new and gives running channels ``grace`` seconds to finish
their batch; the rest are cancelled, which rolls back their open transaction (every batch
commits its items and cursor together, so nothing is lost or duplicated) and records the run
as interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from serversync.core.model import Channel
from serversync.services.runs import ChannelRunner, DueChannel, Run, RunLog

log = logging.getLogger("serversync.scheduler")

Key = tuple[str, Channel]


class Scheduler:
    def __init__(self, runlog: RunLog, runner: ChannelRunner, *, max_concurrency: int = 50,
                 max_sleep_s: float = 5.0, prune_every_s: float = 3600.0,
                 on_run: Callable[[Run], None] | None = None) -> None:
        self.runlog = runlog
        self.runner = runner
        self.max_concurrency = max_concurrency
        self.max_sleep_s = max_sleep_s
        self.prune_every_s = prune_every_s
        self.on_run = on_run
        self.running: dict[Key, asyncio.Task[Run | None]] = {}
        self.per_profile: dict[str, int] = {}
        self._profile_caps: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._collect: list[Run] | None = None
        # Due channels read by the last query but not started yet (over a limit). A slot
        # that frees starts the next of them without asking the database again: one due
        # query per run made a 1,000-mailbox cycle quadratic. Refreshed when empty, when
        # older than ``backlog_s``, and on every external wake ("sync now", push).
        self._backlog: list[DueChannel] = []
        self._backlog_at = 0.0
        self._refresh = True
        self.backlog_s = 2.0
        self.queries = 0  # due queries made (for tests and the benchmark)
        self.peak = 0  # most runs at once, for tests and the benchmark

    # ------------------------------------------------------------ control

    def wake(self, address: str = "", channel: Channel | None = None) -> None:
        """Look for due work now (after a "sync now" or a push notification)."""
        self._refresh = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Schedule until `stop` is called."""
        self._wake = asyncio.Event()
        self.runlog.wakers.append(self.wake)
        loop = asyncio.get_running_loop()
        last_prune = loop.time()
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self.tick()
                except Exception:  # the database may be restarting: log, wait, carry on
                    log.exception("scheduler tick failed")
                if loop.time() - last_prune > self.prune_every_s:
                    last_prune = loop.time()
                    with contextlib.suppress(Exception):
                        await self.runlog.prune()
                # while a backlog waits for free slots, a finishing run wakes us anyway
                delay = self.max_sleep_s if self._backlog else await self._sleep_for()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            if self.wake in self.runlog.wakers:
                self.runlog.wakers.remove(self.wake)

    async def stop(self, grace: float = 30.0) -> None:
        """Start nothing new; let running channels finish for ``grace`` s, then cancel them."""
        self._stopping = True
        self._backlog = []
        self.wake()
        tasks = list(self.running.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # ------------------------------------------------------------ one pass

    async def tick(self) -> list[DueChannel]:
        """Start every due channel that fits within the limits; return those started."""
        if self._stopping:
            return []
        free = self.max_concurrency - len(self.running)
        if free <= 0:
            return []
        now = asyncio.get_running_loop().time()
        if self._refresh or not self._backlog or now - self._backlog_at > self.backlog_s:
            self._refresh = False
            self.queries += 1
            self._backlog = await self.runlog.due(limit=max(free * 4, 100),
                                                  exclude=set(self.running))
            self._backlog_at = now
        if not self._backlog:
            return []
        await self._refresh_caps({d.profile for d in self._backlog})
        started: list[DueChannel] = []
        waiting: list[DueChannel] = []
        for item in self._backlog:
            if (item.mailbox, item.channel) in self.running:
                continue  # started meanwhile: the next query tells whether it is due again
            cap = self._profile_caps.get(item.profile, 1)
            if len(self.running) >= self.max_concurrency \
                    or self.per_profile.get(item.profile, 0) >= cap:
                waiting.append(item)
                continue
            self._start(item)
            started.append(item)
        self._backlog = waiting
        return started

    def _start(self, item: DueChannel) -> None:
        key = (item.mailbox, item.channel)
        self.per_profile[item.profile] = self.per_profile.get(item.profile, 0) + 1
        task = asyncio.create_task(self._run_one(item), name=f"sync {item.channel} {item.mailbox}")
        self.running[key] = task
        self.peak = max(self.peak, len(self.running))

        def done(_: asyncio.Task[Run | None]) -> None:
            self.running.pop(key, None)
            self.per_profile[item.profile] -= 1
            self.wake()  # a slot is free: due work over the limits may start now
        task.add_done_callback(done)

    async def _run_one(self, item: DueChannel) -> Run | None:
        try:
            run = await self.runner.run(item.mailbox, item.channel)
        except asyncio.CancelledError:
            raise
        except Exception:  # recording failed (database down): the channel stays due
            log.exception("sync of %s %s could not be recorded", item.channel, item.mailbox)
            return None
        if run is not None:
            if self._collect is not None:
                self._collect.append(run)
            if self.on_run is not None:
                self.on_run(run)
        return run

    async def _refresh_caps(self, profiles: set[str]) -> None:
        missing = profiles - self._profile_caps.keys()
        if missing or len(self._profile_caps) > 10_000:
            caps = {p.name: max(1, p.max_concurrent_connections)
                    for p in await self.runner.services.list_profiles()}
            self._profile_caps = caps

    def forget_caps(self) -> None:
        """Re-read profiles' connection caps on the next tick (after a profile changed)."""
        self._profile_caps = {}

    async def _sleep_for(self) -> float:
        if self._stopping:
            return 0.0
        try:
            next_at = await self.runlog.next_due_at()
        except Exception:
            return self.max_sleep_s
        if next_at is None:
            return self.max_sleep_s
        seconds = (next_at - self.runlog.clock()).total_seconds()
        return min(self.max_sleep_s, max(0.05, seconds))

    async def run_until_idle(self, *, limit_s: float = 60.0) -> list[Run]:
        """Run everything due now, and what becomes due as a result, until nothing is due.

        For tests and one-shot commands (``serversync sync``): with a fake clock, nothing
        scheduled for later becomes due by itself.
        """
        runs: list[Run] = []
        self._collect = runs
        deadline = asyncio.get_running_loop().time() + limit_s
        try:
            while True:
                await self._refresh_caps(set())
                started = await self.tick()
                if not started and not self.running:
                    return runs
                pending = list(self.running.values())
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise TimeoutError("run_until_idle: work still running")
                if pending:
                    await asyncio.wait(pending, timeout=remaining,
                                       return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # let done-callbacks free the slots
        finally:
            self._collect = None
