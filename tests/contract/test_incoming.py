"""The incoming channel's contract, for every backend (see `tests.contract.backends`).

A delivered message becomes exactly one tracked activity; a run with nothing new adds
nothing and leaves the cursor where it was; mail delivered between runs is picked up; a run
that dies between fetching a batch and committing it is replayed without duplicates; a
mailbox whose login the server refuses gets a channel alert that says what to fix, and the
other mailboxes go on syncing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from serversync import wiring
from serversync.core.email import Direction, EmailActivity, EmailStatus
from serversync.core.model import Channel
from serversync.services.incoming import FAULT_ENV, IncomingJob, IncomingOptions
from serversync.services.runs import ChannelRunner
from serversync.store.crypto import encode_key
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from serversync.store.incoming import Cursor, IncomingStore
from tests.contract.backends import Backend, message

INCOMING = (Channel.INCOMING,)


def job(db: Database, **options: int) -> IncomingJob:
    return IncomingJob(db, wiring.INCOMING_SOURCES, options=IncomingOptions(**options))


async def activities(db: Database) -> list[EmailActivity]:
    async with db.transaction() as repo:
        return list(reversed(await EmailStore(repo.session).list(limit=1000)))


async def cursor(db: Database, address: str) -> Cursor | None:
    async with db.transaction() as repo:
        mailbox = await repo.get_mailbox(address)
        assert mailbox.id is not None
        return await IncomingStore(repo.session).cursor(mailbox.id, "INBOX")


async def test_a_delivered_message_is_tracked_once(backend: Backend, db: Database) -> None:
    await backend.setup(*INCOMING)
    mid, raw = message(backend.user, "Quote request")
    backend.deliver(backend.user, raw)
    first = await job(db)(backend.user)
    assert (first.items, first.failures) == (1, 0), first
    [activity] = await activities(db)
    assert activity.message_id == mid and activity.subject == "Quote request"
    assert activity.direction is Direction.INCOMING and activity.status is EmailStatus.RECEIVED
    assert activity.owner == backend.user.split("@")[0]
    assert activity.recipients[0].party_kind == "contact"  # the sender, resolved
    kept = await cursor(db, backend.user)
    assert kept is not None

    again = await job(db)(backend.user)  # nothing new on the server
    assert (again.items, again.failures) == (0, 0), again
    assert await cursor(db, backend.user) == kept
    assert [a.id for a in await activities(db)] == [activity.id]


async def test_mail_delivered_between_runs_is_picked_up(backend: Backend, db: Database) -> None:
    await backend.setup(*INCOMING)
    earlier = []
    for n in range(2):
        mid, raw = message(backend.user, f"earlier {n}")
        backend.deliver(backend.user, raw)
        earlier.append(mid)
    assert (await job(db)(backend.user)).items == 2
    before = await cursor(db, backend.user)
    later, raw = message(backend.user, "later")
    backend.deliver(backend.user, raw)
    assert (await job(db)(backend.user)).items == 1
    assert await cursor(db, backend.user) != before
    assert [a.message_id for a in await activities(db)] == [*earlier, later]


def _crash_run(db: Database, address: str) -> tuple[int, str]:
    """The incoming job in a process of its own that ``os._exit``s after fetching (and
    parsing) its second batch of two, before committing it: the fault hook of
    `services.incoming`."""
    script = (
        "import asyncio, base64, sys\n"
        "from serversync import wiring\n"
        "from serversync.services.incoming import IncomingJob, IncomingOptions\n"
        "from serversync.store.crypto import Keyring\n"
        "from serversync.store.db import Database\n"
        "async def main():\n"
        "    db = Database(sys.argv[1], Keyring(base64.urlsafe_b64decode(sys.argv[2])))\n"
        "    await IncomingJob(db, wiring.INCOMING_SOURCES,\n"
        "                      options=IncomingOptions(batch_size=2))(sys.argv[3])\n"
        "asyncio.run(main())\n")
    env = {**os.environ, FAULT_ENV: "incoming-before-commit:2"}
    proc = subprocess.run([sys.executable, "-c", script, db.url, encode_key(db.keyring.primary),
                           address], env=env, capture_output=True, timeout=60, check=False)
    return proc.returncode, proc.stderr.decode(errors="replace")[-2000:]


async def test_a_run_killed_before_commit_replays_without_duplicates(backend: Backend,
                                                                     db: Database) -> None:
    await backend.setup(*INCOMING)
    delivered = []
    for n in range(5):
        mid, raw = message(backend.user, f"crash {n}")
        backend.deliver(backend.user, raw)
        delivered.append(mid)
    code, stderr = await asyncio.to_thread(_crash_run, db, backend.user)
    assert code == 86, stderr  # died where the fault hook put it
    assert len(await activities(db)) == 2  # the first batch committed, the second did not
    replay = await job(db, batch_size=2)(backend.user)
    assert (replay.items, replay.failures) == (3, 0), replay
    assert (await job(db, batch_size=2)(backend.user)).items == 0
    assert sorted(a.message_id or "" for a in await activities(db)) == sorted(delivered)


async def test_a_refused_login_alerts_and_the_other_mailbox_syncs(backend: Backend,
                                                                  db: Database) -> None:
    await backend.setup(*INCOMING, bad=True)
    mid, raw = message(backend.user, "still synced")
    backend.deliver(backend.user, raw)
    backend.deliver(backend.other, message(backend.other, "not read")[1])
    backend.services.jobs[Channel.INCOMING] = job(db)
    runner = ChannelRunner(backend.services)
    failed = await runner.run(backend.other, Channel.INCOMING)
    synced = await runner.run(backend.user, Channel.INCOMING)
    assert failed is not None and failed.error_code == backend.bad_login_code, failed
    assert synced is not None and synced.error_code is None and synced.items == 1, synced
    assert [a.message_id for a in await activities(db)] == [mid]
    assert not (await backend.services.get_mailbox(backend.other)).incoming.enabled
    assert (await backend.services.get_mailbox(backend.user)).incoming.enabled
    [alert] = await backend.services.alerts(mailbox=backend.other)
    assert alert.code == backend.bad_login_code and alert.channel is Channel.INCOMING
    assert "secret" in alert.fix  # what to fix: the password or client secret
    wrong = ("not-the-password", "an-old-secret")
    assert not any(w in alert.message + alert.fix for w in wrong)
    assert await backend.services.alerts(mailbox=backend.user) == []
