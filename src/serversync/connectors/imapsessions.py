"""Logged-in IMAP sessions kept between sync runs of a mailbox (a bounded session cache).

Why: a no-change poll that connects, negotiates TLS, logs in and logs out costs ~15-50 ms
of CPU and round trips per mailbox; on a kept session it is one ``STATUS`` per folder
(RFC 3501 §6.3.10; ``HIGHESTMODSEQ`` from RFC 7162 §3.1.4). This is what long-running IMAP
clients do (RFC 3501 §5.4: servers keep authenticated sessions ~30 minutes).

Rules:

* keyed by mailbox address; a session carries an *identity* (a digest of everything its
  login depends on: endpoint, TLS options, access mode, user names, the secret, the
  after-processing mode). A different identity at checkout — a changed password, profile
  or mailbox setting — closes the old session and logs in afresh;
* bounded: at most ``cap`` idle sessions per *group* and ``max_sessions`` in the process.
  The caller passes the profile's ``max_concurrent_connections`` as the cap and, like the
  reference (``dynamics-sss.md`` §2: counted per mailbox with the mailbox's own credentials,
  per profile with the profile's), the mailbox or the profile as the group. When a bound is
  reached the session is logged out instead of parked: polling visits mailboxes in a cycle,
  where evicting the least recently used would evict exactly the next one needed, so a
  stable set of kept sessions serves more runs;
* closed after ``idle_timeout_s`` unused (a background reaper, started lazily), and all of
  them on `close` (shutdown);
* a session that is unusable at checkout (the server closed it, sent something unasked,
  or the transport is closing) is dropped and replaced by a new login. A session that
  dies *during* a run is the caller's to retry on a fresh login (`services.incoming`
  does, once): the incoming run is idempotent, so a retry never loses nor duplicates mail.

The cache is generic over `Reusable` (`connectors.imap.ImapSource` implements it) and does no
I/O until used. Secrets are never stored here in the clear: only a SHA-256 digest of the
identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Reusable(Protocol):
    """A logged-in session that can be parked between runs."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def usable(self) -> bool:
        """Connected, nothing unread from the server, transport not closing (no I/O)."""
        ...

    async def recycle(self) -> bool:
        """Back to the authenticated state for the next run; False if it cannot be reused."""
        ...


S = TypeVar("S", bound=Reusable)


def identity(*parts: object) -> bytes:
    """A digest of what a session depends on; pass secrets revealed, they are only hashed."""
    return hashlib.sha256(repr(parts).encode("utf-8", "surrogatepass")).digest()


@dataclass
class Lease(Generic[S]):
    """One checked-out session. ``reused``: it came from the cache (not a new login)."""

    key: str
    source: S
    identity: bytes
    group: str
    cap: int
    reused: bool


@dataclass
class _Idle(Generic[S]):
    source: S
    identity: bytes
    group: str
    since: float


class SessionCache(Generic[S]):
    """Idle logged-in sessions by mailbox, bounded per group (profile or mailbox) and per process."""

    def __init__(self, *, max_sessions: int = 1000, idle_timeout_s: float = 15 * 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._idle: OrderedDict[str, _Idle[S]] = OrderedDict()  # oldest use first
        self._groups: dict[str, int] = {}  # idle sessions per group
        self._reaper: asyncio.Task[None] | None = None
        self.logins = 0  # new sessions opened (for tests and the benchmark)
        self.reuses = 0  # checkouts served from the cache
        self.dropped = 0  # cached sessions found unusable or of another identity
        self.full = 0  # sessions logged out because a bound was reached

    def __len__(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        return f"SessionCache(idle={len(self._idle)}, max={self.max_sessions})"

    async def acquire(self, key: str, identity: bytes, group: str, cap: int,
                      make: Callable[[], S]) -> Lease[S]:
        """A session for ``key``: the cached one when usable and of the same identity."""
        await self._expire()
        entry = self._pop(key)
        if entry is not None:
            if entry.identity == identity and entry.source.usable():
                self.reuses += 1
                return Lease(key, entry.source, identity, group, cap, True)
            self.dropped += 1
            await _close(entry.source)
        source = make()
        try:
            await source.open()
        except BaseException:
            await _close(source)
            raise
        self.logins += 1
        return Lease(key, source, identity, group, cap, False)

    async def release(self, lease: Lease[S], *, healthy: bool) -> None:
        """Park the session for the next run, or close it (unhealthy, over a cap, no room)."""
        source = lease.source
        keep = healthy and self.max_sessions > 0 and lease.cap > 0
        if keep:
            try:
                keep = await source.recycle() and source.usable()
            except Exception as exc:  # the session broke while being tidied: just drop it
                log.debug("session of %s not reusable: %s", lease.key, type(exc).__name__)
                keep = False
        if keep and (lease.key in self._idle  # (a second session of the same mailbox)
                     or len(self._idle) >= self.max_sessions
                     or self._groups.get(lease.group, 0) >= lease.cap):
            keep = False
            self.full += 1
        if not keep:
            await _close(source)
            return
        self._idle[lease.key] = _Idle(source, lease.identity, lease.group, self.clock())
        self._groups[lease.group] = self._groups.get(lease.group, 0) + 1
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="imap session reaper")

    def _pop(self, key: str) -> _Idle[S] | None:
        entry = self._idle.pop(key, None)
        if entry is not None:
            self._groups[entry.group] -= 1
            if not self._groups[entry.group]:
                del self._groups[entry.group]
        return entry

    async def close(self) -> None:
        """Log out every idle session (shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        entries = list(self._idle.values())
        self._idle.clear()
        self._groups.clear()
        await asyncio.gather(*(_close(e.source) for e in entries))

    async def _expire(self) -> None:
        limit = self.clock() - self.idle_timeout_s
        old = []
        while self._idle:
            key, entry = next(iter(self._idle.items()))
            if entry.since > limit:
                break
            popped = self._pop(key)
            assert popped is not None
            old.append(popped.source)
        if old:
            await asyncio.gather(*(_close(s) for s in old))

    async def _reap(self) -> None:
        while self._idle:
            oldest = next(iter(self._idle.values())).since
            await asyncio.sleep(max(0.05, oldest + self.idle_timeout_s - self.clock()))
            await self._expire()


async def _close(source: Reusable) -> None:
    with contextlib.suppress(Exception):
        await source.close()
