"""Push: keep an IMAP IDLE connection per incoming mailbox and turn news into "sync now".

`Push` decides *which* mailboxes are watched — every approved mailbox whose incoming channel
is enabled, on a server kind that has a watcher (`connectors.imappush` for IMAP, registered
in `serversync.wiring`) — and keeps one watcher task per mailbox: it reconnects with
backoff and jitter when the connection drops, restarts when the mailbox or its profile
changes, and stops when the channel is disabled. A watcher never reads mail; it calls
``notify`` (the local scheduler's "sync now", or a job deferred to the workers), so push only
makes the next sync sooner and cannot lose or duplicate anything. After a reconnect it
notifies once, since mail may have arrived while it was away.

While a mailbox's watcher is connected, `covers` is true and the scheduler polls that
channel only as a safety net (`core.schedule.after_run` with ``push=True``), as EmailEngine
does with its periodic resync next to IDLE (``peers.md`` §1). Logins are staggered
(``connect_concurrency`` at a time) so that a restart does not storm the server.

With many workers, ``claims`` (`runtime.worker.PushClaims`) makes sure that each mailbox is
watched by exactly one process and that the watchers are spread across the live workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from serversync.connectors.net import ConnectOptions
from serversync.core import rules
from serversync.core.errors import SyncError
from serversync.core.model import ApprovalStatus, Channel, Mailbox, Profile, ServerKind, SyncMethod
from serversync.core.rules import Login
from serversync.core.schedule import Backoff, Outcome, classify
from serversync.services import Services, connect_options

log = logging.getLogger("serversync.push")

Notify = Callable[[str, Channel], Awaitable[None]]


class Watch(Protocol):
    """A connector's push watcher (`connectors.imappush.watch`)."""

    async def __call__(self, profile: Profile, mailbox: Mailbox, login: Login,
                       options: ConnectOptions, *, on_ready: Callable[[], Awaitable[None]],
                       on_change: Callable[[], Awaitable[None]], refresh_s: float = ...
                       ) -> None: ...


class Claims(Protocol):
    """Who watches which mailbox when several processes run (`runtime.worker.PushClaims`)."""

    async def share(self, total: int) -> int:
        """How many of ``total`` watchable mailboxes this process should hold."""
        ...

    async def claim(self, address: str) -> bool: ...

    async def release(self, address: str) -> None: ...


@dataclasses.dataclass
class _Watcher:
    mailbox: Mailbox
    profile: Profile
    task: asyncio.Task[None]


def _identity(mailbox: Mailbox, profile: Profile) -> tuple[object, ...]:
    """What a watcher's connection depends on (status changes after each run do not count)."""
    return (mailbox.username, mailbox.secret, mailbox.allow_credentials, mailbox.folders,
            mailbox.owner, profile)


class Push:
    def __init__(self, services: Services, watchers: Mapping[ServerKind, Watch], notify: Notify,
                 *, rescan_s: float = 30.0, refresh_s: float = 25 * 60,
                 connect_concurrency: int = 20, claims: Claims | None = None,
                 backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        self.services = services
        self.watchers = dict(watchers)
        self.notify = notify
        self.rescan_s = rescan_s
        self.refresh_s = refresh_s
        self.connect_concurrency = connect_concurrency
        self.claims = claims
        self.backoff = backoff or Backoff(base_s=5.0, cap_s=300.0)
        self.rng = rng or random.Random()
        self.ready: set[str] = set()  # mailboxes with a live IDLE right now
        self.unsupported: set[str] = set()  # the server has no push: polled instead
        self.notifications = 0
        self._watching: dict[str, _Watcher] = {}
        self._gate: asyncio.Semaphore | None = None
        self._stop: asyncio.Event | None = None

    def covers(self, address: str, channel: Channel) -> bool:
        return channel is Channel.INCOMING and address in self.ready

    @property
    def watching(self) -> int:
        return len(self._watching)

    async def run(self) -> None:
        self._stop = asyncio.Event()
        try:
            while not self._stop.is_set():
                try:
                    await self.rescan()
                except Exception:  # the database may be restarting: try again later
                    log.exception("push rescan failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.rescan_s)
        finally:
            await self._stop_all()

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        await self._stop_all()

    async def _stop_all(self) -> None:
        watchers = list(self._watching.values())
        self._watching.clear()
        for watcher in watchers:
            watcher.task.cancel()
        for watcher in watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher.task
            if self.claims is not None:
                with contextlib.suppress(Exception):
                    await self.claims.release(watcher.mailbox.address)
        self.ready.clear()

    async def eligible(self) -> list[tuple[Mailbox, Profile]]:
        async with self.services.db.transaction() as repo:
            approved_only = (await repo.get_settings()).process_only_approved_mailboxes
            profiles = {p.name: p for p in await repo.list_profiles()
                        if p.kind in self.watchers and p.incoming is not None}
            mailboxes = await repo.list_mailboxes()
        return [(m, profiles[m.profile]) for m in mailboxes
                if m.profile in profiles and m.incoming.method is SyncMethod.SERVER_SIDE
                and m.incoming.enabled
                and (not approved_only or m.approval is ApprovalStatus.APPROVED)]

    async def rescan(self) -> None:
        """Start, restart and stop watchers to match the configuration."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.connect_concurrency)
        wanted = {m.address: (m, p) for m, p in await self.eligible()}
        for address, watcher in list(self._watching.items()):
            current = wanted.get(address)
            changed = current is None or _identity(*current) != _identity(watcher.mailbox,
                                                                         watcher.profile)
            if changed or watcher.task.done():
                if changed:
                    self.unsupported.discard(address)
                await self._drop(address)
        limit = len(wanted)
        if self.claims is not None:
            limit = await self.claims.share(len(wanted))
            for address in list(self._watching)[limit:]:  # a new worker joined: hand over
                await self._drop(address)
        for address, (mailbox, profile) in wanted.items():
            if len(self._watching) >= limit:
                break
            if address in self._watching or address in self.unsupported:
                continue
            if self.claims is not None and not await self.claims.claim(address):
                continue
            task = asyncio.create_task(self._watch(mailbox, profile), name=f"idle {address}")
            self._watching[address] = _Watcher(mailbox, profile, task)

    async def _drop(self, address: str) -> None:
        watcher = self._watching.pop(address, None)
        self.ready.discard(address)
        if watcher is None:
            return
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher.task
        if self.claims is not None:
            await self.claims.release(address)

    async def _watch(self, mailbox: Mailbox, profile: Profile) -> None:
        address, failures, connected_before = mailbox.address, 0, False
        watch = self.watchers[profile.kind]
        assert self._gate is not None
        while True:
            gate_held, delay = False, self.rescan_s
            try:
                login = rules.login_for(profile, mailbox, Channel.INCOMING)
                await self._gate.acquire()
                gate_held = True

                async def ready() -> None:
                    nonlocal gate_held, failures, connected_before
                    assert self._gate is not None
                    if gate_held:
                        self._gate.release()
                        gate_held = False
                    self.ready.add(address)
                    if connected_before:  # mail may have come while we were away
                        await self._notify(address)
                    connected_before, failures = True, 0

                async def change() -> None:
                    await self._notify(address)

                await watch(profile, mailbox, login, connect_options(profile), on_ready=ready,
                            on_change=change, refresh_s=self.refresh_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = classify(exc)
                self.ready.discard(address)
                if failure.outcome is Outcome.PERMANENT:
                    # Wrong password and the like: the sync run reports it with an alert and
                    # disables the channel; no push until the configuration changes.
                    log.info("push for %s stopped: %s", address, failure.message)
                    self.unsupported.add(address)
                    return
                failures += 1
                delay = self.backoff.delay(failures, self.rng, failure.retry_after)
                log.info("push for %s lost (%s); reconnecting in %.0f s", address,
                         failure.message if isinstance(exc, SyncError) else exc, delay)
            finally:
                self.ready.discard(address)
                if gate_held:
                    self._gate.release()
            await asyncio.sleep(delay)

    async def _notify(self, address: str) -> None:
        self.notifications += 1
        try:
            await self.notify(address, Channel.INCOMING)
        except Exception as exc:  # a disabled channel, a database hiccup: polling covers it
            log.info("push notification for %s not delivered: %s", address, exc)
