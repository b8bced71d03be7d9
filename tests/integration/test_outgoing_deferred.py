"""Deferred recipients against the real Postfix + Dovecot: retried alone, once, then given up.

Postfix's submission port 10027 (testservers/postfix/master.cf) is 10025 plus two temporary
refusals at RCPT TO: 450 for ``<user>+defer@example.test`` and 452 4.5.3 "too many
recipients" past the third recipient of a transaction. Switching the profile to 10025 is
"the recipient's server stopped deferring". Deliveries are counted by Message-ID in each
recipient's INBOX through Dovecot; the sender's Sent folder must hold exactly one copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic import command

from serversync.core.email import EmailStatus
from serversync.core.model import Endpoint, TlsMode
from serversync.core.outgoing import (
    LEASE,
    MAX_ATTEMPTS,
    Phase,
    RecipientStatus,
    SendState,
    backoff,
)
from serversync.services.outgoing import CRASH_ENV, CRASH_EXIT, NewEmail, OutgoingService
from serversync.store.crypto import encode_key
from serversync.store.db import Database, alembic_config
from serversync.store.emails import EmailStore
from serversync.store.outgoing import OutgoingStore
from tests.integration.test_outgoing import BOB, DAVE, OWN, add_mailbox, count, settle
from tests.testservers import HOST, master_login, wait_for_message

pytestmark = pytest.mark.servers

DEFER_PORT = 10027
DEFERRING = dataclasses.replace(OWN, name="deferring",
                                outgoing=Endpoint(HOST, DEFER_PORT, TlsMode.STARTTLS))
HEIDI, IVAN, JUDY, SINK = ("heidi@example.test", "ivan@example.test", "judy@example.test",
                           "sink@example.test")


@pytest.fixture(autouse=True)
def _servers(test_servers: object) -> None:
    """Every test here needs the loopback servers."""


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


async def stop_deferring(db: Database) -> None:
    """The administrator points the profile at 10025, where nothing is deferred."""
    async with db.transaction() as repo:
        profile = await repo.get_profile(DEFERRING.name)
        await repo.save_profile(dataclasses.replace(profile, outgoing=OWN.outgoing))


def raw_of(user: str, message_id: str) -> bytes:
    """The message as delivered (trace headers first), line ends normalised to LF."""
    uid = wait_for_message(user, message_id)
    conn = master_login(user)
    try:
        conn.select("INBOX", readonly=True)
        typ, data = conn.uid("FETCH", str(uid), "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(data[0], tuple), data
        return bytes(data[0][1]).replace(b"\r\n", b"\n")
    finally:
        conn.logout()


async def kept_raw(db: Database, email_id: int) -> bytes:
    async with db.transaction() as repo:
        emails = EmailStore(repo.session)
        activity = await emails.get(email_id)
        assert activity.content_hash
        return await emails.get_blob(activity.content_hash)


def by_address(state: SendState) -> dict[str, tuple[RecipientStatus, int, int]]:
    return {r.address: (r.status, r.code, r.attempts) for r in state.recipients}


# ---------------------------------------------------------------- partial acceptance


async def test_deferred_recipient_gets_the_same_message_once_on_a_later_run(
        db: Database) -> None:
    later = "heidi+defer@example.test"
    await add_mailbox(db, DEFERRING, BOB)
    clock = Clock()
    start = clock.now
    outgoing = OutgoingService(db, clock=clock)
    created = await outgoing.create(NewEmail(BOB, "partly deferred", to=[DAVE, later],
                                             text="the same message for both"))
    email_id, mid = created.id or 0, created.message_id or ""

    summary = await outgoing(BOB)
    assert (summary.items, summary.failures) == (1, 0)
    assert "1 recipients deferred" in summary.detail
    state = await outgoing.state(email_id)
    assert state.status is EmailStatus.SENT and state.phase is Phase.DONE
    assert by_address(state) == {DAVE: (RecipientStatus.ACCEPTED, 250, 1),
                                 later: (RecipientStatus.DEFERRED, 450, 1)}
    (pending,) = state.deferred
    assert pending.next_attempt_at == start + backoff(1)
    assert "Mailbox temporarily unavailable" in pending.message
    assert state.last_error_code == "recipients-deferred"
    assert state.last_error and f"delivery to {later} pending: 450 4.2.1" in state.last_error
    assert "attempt 1 of 10" in state.last_error
    assert settle(DAVE, mid) == 1 and count(HEIDI, mid) == 0
    assert count(BOB, mid, "Sent") == 1

    assert (await outgoing(BOB)).items == 0  # not due yet
    await stop_deferring(db)
    clock.now = start + backoff(1) + dt.timedelta(seconds=1)
    summary = await outgoing(BOB)
    assert summary.items == 1 and "1 deferred recipients delivered" in summary.detail
    state = await outgoing.state(email_id)
    assert state.status is EmailStatus.SENT and state.phase is Phase.DONE
    assert by_address(state) == {DAVE: (RecipientStatus.ACCEPTED, 250, 1),
                                 later: (RecipientStatus.ACCEPTED, 250, 2)}
    assert state.last_error is None and state.last_error_code is None
    assert state.attempts == 1  # the email's own attempts: it was sent the first time
    assert settle(HEIDI, mid) == 1

    # the same bytes: what dave got first is what heidi got later, behind the trace headers
    sent = (await kept_raw(db, email_id)).replace(b"\r\n", b"\n")
    assert raw_of(DAVE, mid).endswith(sent) and raw_of(HEIDI, mid).endswith(sent)
    assert b"\nBcc:" not in sent

    clock.now += dt.timedelta(hours=2)
    assert (await outgoing(BOB)).items == 0
    assert (count(DAVE, mid), count(HEIDI, mid), count(BOB, mid, "Sent")) == (1, 1, 1)


async def test_too_many_recipients_are_sent_at_once_in_another_transaction(
        db: Database) -> None:
    """452 4.5.3 past the third recipient: not a failed attempt, due immediately."""
    await add_mailbox(db, DEFERRING, BOB)
    clock = Clock()
    outgoing = OutgoingService(db, clock=clock)
    created = await outgoing.create(NewEmail(BOB, "five recipients", to=[DAVE, HEIDI, IVAN],
                                             cc=[JUDY], bcc=[SINK], text="x"))
    email_id, mid = created.id or 0, created.message_id or ""
    summary = await outgoing(BOB)
    assert summary.more  # due again at once: the runtime continues within a second
    state = await outgoing.state(email_id)
    assert by_address(state) == {
        DAVE: (RecipientStatus.ACCEPTED, 250, 1), HEIDI: (RecipientStatus.ACCEPTED, 250, 1),
        IVAN: (RecipientStatus.ACCEPTED, 250, 1), JUDY: (RecipientStatus.DEFERRED, 452, 0),
        SINK: (RecipientStatus.DEFERRED, 452, 0)}
    assert {r.next_attempt_at for r in state.deferred} == {clock.now}
    summary = await outgoing(BOB)  # same clock: no backoff
    assert not summary.more and "2 deferred recipients delivered" in summary.detail
    state = await outgoing.state(email_id)
    assert all(r.status is RecipientStatus.ACCEPTED for r in state.recipients)
    assert state.last_error_code is None
    for user in (DAVE, HEIDI, IVAN, JUDY, SINK):
        assert settle(user, mid) == 1, user
    assert count(BOB, mid, "Sent") == 1


# ---------------------------------------------------------------- giving up


async def test_deferred_until_the_last_attempt_then_failed_with_the_reason(
        db: Database) -> None:
    never = "ivan+defer@example.test"
    await add_mailbox(db, DEFERRING, BOB)
    clock = Clock()
    outgoing = OutgoingService(db, clock=clock)
    created = await outgoing.create(NewEmail(BOB, "never accepted", to=[DAVE, never],
                                             text="x"))
    email_id, mid = created.id or 0, created.message_id or ""
    await outgoing(BOB)
    for attempt in range(1, MAX_ATTEMPTS):
        (pending,) = (await outgoing.state(email_id)).deferred
        assert pending.attempts == attempt
        assert pending.next_attempt_at == clock.now + backoff(attempt)  # 1, 2, 4 ... 60 min
        clock.now = pending.next_attempt_at + dt.timedelta(seconds=1)
        await outgoing(BOB)
    state = await outgoing.state(email_id)
    assert state.status is EmailStatus.SENT and not state.deferred
    failed = {r.address: r for r in state.recipients}[never]
    assert (failed.status, failed.code, failed.attempts) == (RecipientStatus.FAILED, 450,
                                                             MAX_ATTEMPTS)
    assert failed.message.startswith(f"gave up after {MAX_ATTEMPTS} attempts; last reply: "
                                     "450 4.2.1")
    assert failed.next_attempt_at is None
    assert state.last_error_code == "recipients-refused"
    assert state.last_error and state.last_error.startswith(f"not delivered to {never}: gave up")
    async with db.transaction() as repo:
        alerts = await repo.list_alerts(mailbox=BOB)
    (alert,) = [a for a in alerts if a.code == "recipients-failed"]
    assert f"email activity {email_id}" in alert.message and never in alert.message
    assert "new email" in alert.fix

    clock.now += dt.timedelta(days=1)
    await stop_deferring(db)
    assert (await outgoing(BOB)).items == 0  # given up means never sent to it again
    assert settle(DAVE, mid) == 1 and count(IVAN, mid) == 0
    assert count(BOB, mid, "Sent") == 1


# ---------------------------------------------------------------- never twice


_CHILD = """
import asyncio, base64, datetime as dt, sys
from serversync.services.outgoing import OutgoingService
from serversync.store.crypto import Keyring
from serversync.store.db import Database

async def main() -> None:
    db = Database(sys.argv[1], Keyring(base64.urlsafe_b64decode(sys.argv[2])))
    ahead = dt.timedelta(seconds=float(sys.argv[4]))
    await OutgoingService(db, clock=lambda: dt.datetime.now(dt.UTC) + ahead)(sys.argv[3])

asyncio.run(main())
"""


def _run_child(db: Database, address: str, crash: str, ahead: dt.timedelta) -> int:
    env = {**os.environ, CRASH_ENV: crash}
    proc = subprocess.run([sys.executable, "-c", _CHILD, db.url, encode_key(db.keyring.primary),
                           address, str(ahead.total_seconds())], env=env, capture_output=True,
                          timeout=60, check=False)
    return proc.returncode


async def test_crash_after_data_of_a_follow_up_never_sends_twice(db: Database) -> None:
    later = "judy+defer@example.test"
    await add_mailbox(db, DEFERRING, BOB)
    outgoing = OutgoingService(db)
    created = await outgoing.create(NewEmail(BOB, "follow-up crash", to=[DAVE, later],
                                             text="once"))
    email_id, mid = created.id or 0, created.message_id or ""
    await outgoing(BOB)
    assert [r.address for r in (await outgoing.state(email_id)).deferred] == [later]
    await stop_deferring(db)

    ahead = backoff(1) + dt.timedelta(seconds=5)
    # killed right after the server's 250 to the follow-up's DATA, before any commit
    assert await asyncio.to_thread(_run_child, db, BOB, "after-data", ahead) == CRASH_EXIT
    assert wait_for_message(JUDY, mid)
    state = await outgoing.state(email_id)
    assert state.status is EmailStatus.SENT and state.phase is Phase.SUBMITTING
    assert [r.address for r in state.deferred] == [later]  # still deferred in the record

    after_lease = dt.datetime.now(dt.UTC) + ahead + LEASE + dt.timedelta(minutes=1)
    rerun = OutgoingService(db, clock=lambda: after_lease)
    await rerun(BOB)
    await rerun(BOB)
    state = await rerun.state(email_id)
    assert state.status is EmailStatus.SENT and state.phase is Phase.DONE
    unknown = {r.address: r for r in state.recipients}[later]
    assert unknown.status is RecipientStatus.FAILED and unknown.attempts == 2
    assert "may or may not have accepted it" in unknown.message
    assert state.last_error_code == "recipients-refused"
    assert (settle(JUDY, mid), count(DAVE, mid), count(BOB, mid, "Sent")) == (1, 1, 1)
    async with db.transaction() as repo:
        assert [a.code for a in await repo.list_alerts(mailbox=BOB)] == ["recipients-failed"]


async def test_follow_up_claimed_by_a_crashed_run_is_put_back_and_sent(
        sqlite_db: Database) -> None:
    later = "heidi+defer@example.test"
    await add_mailbox(sqlite_db, DEFERRING, BOB)
    clock = Clock()
    outgoing = OutgoingService(sqlite_db, clock=clock)
    created = await outgoing.create(NewEmail(BOB, "follow-up claimed", to=[DAVE, later],
                                             text="x"))
    email_id, mid = created.id or 0, created.message_id or ""
    await outgoing(BOB)
    await stop_deferring(sqlite_db)
    clock.now += backoff(1) + dt.timedelta(seconds=1)
    async with sqlite_db.transaction() as repo:  # a run that claimed it, then died
        taken = await OutgoingStore(repo.session).claim_followups(
            BOB, clock.now, limit=10, lease=LEASE, owner="dead")
    assert [(c.email_id, c.followup) for c in taken] == [(email_id, (later,))]
    assert (await outgoing(BOB)).items == 0  # its lease still holds it
    clock.now += LEASE + dt.timedelta(seconds=1)
    summary = await outgoing(BOB)
    assert "1 put back" in summary.detail and "1 deferred recipients delivered" in summary.detail
    state = await outgoing.state(email_id)
    assert {r.address: (r.status, r.attempts) for r in state.recipients}[later] == (
        RecipientStatus.ACCEPTED, 2)  # the attempt that never started is not counted
    assert (settle(HEIDI, mid), count(DAVE, mid), count(BOB, mid, "Sent")) == (1, 1, 1)


# ---------------------------------------------------------------- migration


async def test_migration_settles_deferrals_that_older_versions_never_retried(
        db: Database) -> None:
    """0014 marks pre-existing deferred entries failed (no promise of a retry), and its
    downgrade leaves only statuses the older code can read."""
    await add_mailbox(db, OWN, BOB)
    outgoing = OutgoingService(db)
    old = await outgoing.create(NewEmail(BOB, "old", to=[DAVE, HEIDI], text="x"))
    new = await outgoing.create(NewEmail(BOB, "new", to=[DAVE, IVAN], text="x"))
    legacy = [{"address": DAVE, "status": "accepted", "code": 250, "message": "2.1.5 Ok"},
              {"address": HEIDI, "status": "deferred", "code": 450, "message": "4.2.1 later"}]
    current = [{"address": DAVE, "status": "accepted", "code": 250, "message": "2.1.5 Ok",
                "attempts": 1},
               {"address": IVAN, "status": "failed", "code": 450, "attempts": 10,
                "message": "gave up after 10 attempts; last reply: 450 4.2.1 later"}]

    def downgrade(connection: object) -> None:
        command.downgrade(alembic_config(connection), "0004")  # type: ignore[arg-type]

    def upgrade(connection: object) -> None:
        command.upgrade(alembic_config(connection), "heads")  # type: ignore[arg-type]

    async def set_results(email_id: int, results: object) -> None:
        """As a Sent email with refused recipients, written with the columns of 0004."""
        emails = sa.table("emails", sa.column("id", sa.Integer()),
                          sa.column("status", sa.String()))
        rows = sa.table("outgoing", sa.column("email_id", sa.Integer()),
                        sa.column("last_error_code", sa.String()),
                        sa.column("recipient_results", sa.JSON()))
        async with db.engine.begin() as conn:
            await conn.execute(sa.update(emails).where(emails.c.id == email_id)
                               .values(status="sent"))
            await conn.execute(sa.update(rows).where(rows.c.email_id == email_id)
                               .values(recipient_results=results,
                                       last_error_code="recipients-refused"))

    await set_results(new.id or 0, current)
    async with db.engine.begin() as conn:
        await conn.run_sync(downgrade)
    await set_results(old.id or 0, legacy)
    async with db.engine.begin() as conn:
        await conn.run_sync(upgrade)
    async with db.transaction() as repo:
        store = OutgoingStore(repo.session)
        was_new = {r.address: r for r in (await store.state(new.id or 0)).recipients}
        was_old = {r.address: r for r in (await store.state(old.id or 0)).recipients}
    assert was_new[IVAN].status is RecipientStatus.REJECTED  # what the older code read
    assert was_old[DAVE].status is RecipientStatus.ACCEPTED
    assert (was_old[HEIDI].status, was_old[HEIDI].code) == (RecipientStatus.FAILED, 450)
    assert was_old[HEIDI].message == ("not retried: deferred before serversync retried "
                                      "deferred recipients; last reply: 450 4.2.1 later")
    assert was_old[HEIDI].next_attempt_at is None and was_old[HEIDI].attempts == 0

