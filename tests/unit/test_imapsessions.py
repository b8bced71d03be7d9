"""The IMAP session cache (connectors.imapsessions) with fake sessions and a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from serversync.connectors.imapsessions import SessionCache, identity


class FakeSession:
    opened = 0

    def __init__(self, name: str, *, recyclable: bool = True) -> None:
        self.name = name
        self.open_ = False
        self.closed = False
        self.alive = True
        self.recyclable = recyclable

    async def open(self) -> None:
        FakeSession.opened += 1
        self.open_ = True

    async def close(self) -> None:
        self.closed = True
        self.open_ = False

    def usable(self) -> bool:
        return self.open_ and self.alive

    async def recycle(self) -> bool:
        return self.recyclable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ID = identity("profile", "user", "secret")


async def cycle(cache: SessionCache[FakeSession], key: str, *, ident: bytes = ID,
                profile: str = "p", cap: int = 10, healthy: bool = True) -> tuple[FakeSession, bool]:
    lease = await cache.acquire(key, ident, profile, cap, lambda: FakeSession(key))
    await cache.release(lease, healthy=healthy)
    return lease.source, lease.reused


async def test_second_run_reuses_the_logged_in_session() -> None:
    cache: SessionCache[FakeSession] = SessionCache()
    first, reused1 = await cycle(cache, "a@x")
    second, reused2 = await cycle(cache, "a@x")
    assert (reused1, reused2) == (False, True)
    assert second is first and not first.closed
    assert (cache.logins, cache.reuses) == (1, 1)
    await cache.close()
    assert first.closed and len(cache) == 0


async def test_changed_identity_logs_in_again_and_closes_the_old_session() -> None:
    cache: SessionCache[FakeSession] = SessionCache()
    old, _ = await cycle(cache, "a@x")
    new, reused = await cycle(cache, "a@x", ident=identity("profile", "user", "new secret"))
    assert not reused and new is not old and old.closed
    assert cache.dropped == 1
    await cache.close()


async def test_a_session_the_server_closed_is_replaced_at_checkout() -> None:
    cache: SessionCache[FakeSession] = SessionCache()
    old, _ = await cycle(cache, "a@x")
    old.alive = False  # e.g. * BYE and EOF while parked
    new, reused = await cycle(cache, "a@x")
    assert not reused and new is not old and old.closed
    await cache.close()


async def test_unhealthy_or_unrecyclable_sessions_are_not_kept() -> None:
    cache: SessionCache[FakeSession] = SessionCache()
    broken, _ = await cycle(cache, "a@x", healthy=False)
    assert broken.closed and len(cache) == 0
    lease = await cache.acquire("b@x", ID, "p", 10, lambda: FakeSession("b", recyclable=False))
    await cache.release(lease, healthy=True)
    assert lease.source.closed and len(cache) == 0


async def test_group_cap_and_process_cap_keep_the_parked_ones() -> None:
    # polling visits mailboxes in a cycle: a full cache logs the newcomer out rather than
    # evicting the session the next run needs
    cache: SessionCache[FakeSession] = SessionCache(max_sessions=3)
    a, _ = await cycle(cache, "a@x", cap=2)
    b, _ = await cycle(cache, "b@x", cap=2)
    c, _ = await cycle(cache, "c@x", cap=2)  # third of group p
    assert c.closed and not a.closed and not b.closed and len(cache) == 2
    d, _ = await cycle(cache, "d@y", profile="q", cap=5)
    e, _ = await cycle(cache, "e@y", profile="q", cap=5)  # process cap 3
    assert e.closed and not d.closed and len(cache) == 3 and cache.full == 2
    again, reused = await cycle(cache, "a@x", cap=2)  # a checked out and back: still room
    assert reused and again is a and len(cache) == 3
    await cache.close()
    assert all(s.closed for s in (a, b, d))


async def test_idle_sessions_are_closed_after_the_timeout() -> None:
    clock = Clock()
    cache: SessionCache[FakeSession] = SessionCache(idle_timeout_s=60, clock=clock)
    old, _ = await cycle(cache, "a@x")
    clock.now += 30
    fresh, _ = await cycle(cache, "b@x")
    clock.now += 31  # a: 61 s idle, b: 31 s
    again, reused = await cycle(cache, "b@x")
    assert old.closed and reused and again is fresh and len(cache) == 1
    await cache.close()


async def test_the_reaper_closes_idle_sessions_without_further_use() -> None:
    cache: SessionCache[FakeSession] = SessionCache(idle_timeout_s=0.05)
    session, _ = await cycle(cache, "a@x")
    for _ in range(100):
        if session.closed:
            break
        await asyncio.sleep(0.01)
    assert session.closed and len(cache) == 0
    await cache.close()


async def test_cap_zero_keeps_nothing_and_failed_open_is_not_counted() -> None:
    cache: SessionCache[FakeSession] = SessionCache(max_sessions=0)
    session, _ = await cycle(cache, "a@x")
    assert session.closed and len(cache) == 0

    class Refused(FakeSession):
        async def open(self) -> None:
            raise ConnectionRefusedError

    made: list[FakeSession] = []

    def make() -> FakeSession:
        made.append(Refused("x"))
        return made[-1]
    with pytest.raises(ConnectionRefusedError):
        await cache.acquire("x@x", ID, "p", 1, make)
    assert made[0].closed and cache.logins == 1


def test_identity_is_a_digest_not_the_secret() -> None:
    digest = identity("user", "hunter2")
    assert b"hunter2" not in digest and len(digest) == 32
    assert digest == identity("user", "hunter2") != identity("user", "hunter3")
    assert "hunter2" not in repr(SessionCache())
