"""IMAP IDLE push against the real Dovecot: new mail reaches the incoming job within seconds.

User frank (this suite's IMAP user). The incoming job is a recorder, so the test measures
the runtime's part — IDLE notification → "sync now" → scheduler → job — not the parsing.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serversync import wiring
from serversync.core.model import (
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
    SyncMethod,
    TlsMode,
)
from serversync.core.secret import Secret
from serversync.runtime.push import Push
from serversync.runtime.scheduler import Scheduler
from serversync.services import RunSummary, Services
from serversync.services.runs import ChannelRunner, RunLog
from serversync.store.db import Database
from tests.testservers import CA_FILE, HOST, IMAP_PORT, deliver_lmtp, password, reset_mailbox

pytestmark = pytest.mark.servers
FRANK = "frank@example.test"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, address: str) -> RunSummary:
        self.calls.append(time.monotonic())
        return RunSummary()


async def configure(db: Database, secret: str) -> None:
    async with db.transaction() as repo:
        await repo.save_profile(Profile(
            "push", ServerKind.IMAP, Endpoint(HOST, IMAP_PORT, TlsMode.STARTTLS),
            credential_source=CredentialSource.MAILBOX, ca_file=str(CA_FILE),
            min_polling_interval_s=600))
        await repo.save_party(Party(PartyKind.USER, "frank", "Frank", (FRANK,)))
        await repo.save_mailbox(Mailbox(
            FRANK, PartyKind.USER, "frank", "push",
            incoming=ChannelState(SyncMethod.SERVER_SIDE, True, ChannelStatus.SUCCESS),
            allow_credentials=True, username=FRANK, secret=Secret(secret),
            approval=ApprovalStatus.APPROVED))


async def wait_until(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_idle_push_triggers_sync_within_seconds(test_servers: object,
                                                      sqlite_db: Database) -> None:
    reset_mailbox(FRANK)
    await configure(sqlite_db, password(FRANK))
    job = Recorder()
    services = Services(sqlite_db, wiring.PROBERS, jobs={Channel.INCOMING: job})
    runlog = RunLog(sqlite_db)
    push = Push(services, wiring.PUSHERS, runlog.request_sync, rescan_s=0.5)
    scheduler = Scheduler(runlog, ChannelRunner(services, push=push.covers))
    tasks = [asyncio.create_task(scheduler.run()), asyncio.create_task(push.run())]
    try:
        await wait_until(lambda: push.covers(FRANK, Channel.INCOMING) and job.calls, 10)
        calls = len(job.calls)
        await runlog.request_sync(FRANK, Channel.INCOMING)  # a run while push is connected
        await wait_until(lambda: len(job.calls) > calls, 5)
        await asyncio.sleep(0.3)
        [schedule] = await runlog.schedules(FRANK)
        assert "IMAP IDLE push is on" in schedule.why  # polling is only the safety net now
        latencies = []
        for i in range(3):
            before = len(job.calls)
            sent = time.monotonic()
            await asyncio.to_thread(deliver_lmtp, FRANK,
                                    f"Subject: push {i}\r\n\r\nhello\r\n".encode())
            await wait_until(lambda n=before: len(job.calls) > n, 5)
            latencies.append(job.calls[-1] - sent)
        assert max(latencies) < 3.0, latencies
        assert push.notifications >= 3
    finally:
        await push.stop()
        await scheduler.stop(grace=5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_wrong_password_stops_push_and_polling_remains(test_servers: object,
                                                             sqlite_db: Database) -> None:
    await configure(sqlite_db, "not-the-password")
    services = Services(sqlite_db, wiring.PROBERS, jobs={Channel.INCOMING: Recorder()})
    push = Push(services, wiring.PUSHERS, RunLog(sqlite_db).request_sync)
    await push.rescan()
    await wait_until(lambda: FRANK in push.unsupported, 10)
    assert not push.covers(FRANK, Channel.INCOMING)
    await push.rescan()  # not retried until the configuration changes
    assert push.watching == 0
    await push.stop()
