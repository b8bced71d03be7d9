"""The quarantine of incoming mail (`services.quarantine`), on SQLite and PostgreSQL.

Messages get into the quarantine through a real incoming run against Dovecot (delivered by
LMTP, read over IMAP), for two real causes: the database refuses the message (a trigger
that refuses undated email activities, the kind of constraint a DBA adds, and which a
message with an unreadable Date header breaks), and the loop guard. Then the cause is fixed
(the trigger dropped, the sender resumed) and the message retried: exactly one activity,
never a second one — not on a second retry, not on two retries at once, not when the same
Message-ID was tracked meanwhile through another mailbox. Test users: alice and support (as
in test_incoming, whose helpers this reuses).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils

import pytest
from sqlalchemy import text

from serversync.core.email import Direction, EmailStatus
from serversync.core.errors import NotFound, RuleViolation
from serversync.core.tracking import LoopPolicy
from serversync.services import Services
from serversync.services.quarantine import Quarantine, RetryResult, quarantine_of
from serversync.store.db import Database
from serversync.store.incoming import IncomingStore
from tests import testservers as ts
from tests.integration.test_incoming import (
    ALICE,
    SUPPORT,
    activities,
    append,
    job,
    links,
    msg,
    own,
    setup,
)

pytestmark = pytest.mark.usefixtures("test_servers")

REFUSAL = "undated email activities are refused here"


@pytest.fixture(autouse=True)
def _clean() -> None:
    for user in (ALICE, SUPPORT):
        ts.reset_mailbox(user)


async def refuse_undated(db: Database) -> None:
    """The database refuses email activities without a sent date (a trigger, on both)."""
    async with db.transaction() as repo:
        if repo.session.get_bind().dialect.name == "sqlite":
            await repo.session.execute(text(
                "CREATE TRIGGER refuse_undated BEFORE INSERT ON emails "
                f"WHEN NEW.sent_at IS NULL BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"))
        else:
            await repo.session.execute(text(
                "CREATE FUNCTION refuse_undated() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.sent_at IS NULL THEN RAISE EXCEPTION '{REFUSAL}'; END IF; "
                "RETURN NEW; END $$"))
            await repo.session.execute(text(
                "CREATE TRIGGER refuse_undated BEFORE INSERT ON emails FOR EACH ROW "
                "EXECUTE FUNCTION refuse_undated()"))


async def accept_undated(db: Database) -> None:
    """The cause fixed: the trigger is gone."""
    async with db.transaction() as repo:
        on = "" if repo.session.get_bind().dialect.name == "sqlite" else " ON emails"
        await repo.session.execute(text(f"DROP TRIGGER refuse_undated{on}"))


def undated(to: str, subject: str, message_id: str | None = None) -> bytes:
    """A malformed message: its Date header cannot be read (so it has no sent date)."""
    mid = message_id or email.utils.make_msgid(domain="test.serversync")
    return (f"From: Olga <olga@customer.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: the day after tomorrow, 99:99\r\nMessage-ID: {mid}\r\n\r\n"
            "body\r\n").encode()


async def open_alerts(services: Services, address: str) -> list[str]:
    return [a.code for a in await services.alerts(mailbox=address)]


async def test_refused_message_is_retried_once_the_cause_is_fixed(services: Services,
                                                                  db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all")])
    await refuse_undated(db)
    ts.deliver_lmtp(ALICE, msg(ALICE, "fine"))
    mid = ts.deliver_lmtp(ALICE, undated(ALICE, "no date"))
    summary = await job(db)(ALICE)
    assert (summary.items, summary.failures) == (1, 1)
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=ALICE)
    assert (q.mailbox, q.folder, q.code, q.retries, q.sent) == (ALICE, "INBOX", "store-refused",
                                                                0, False)
    assert REFUSAL in q.reason and q.released_at is None and q.size > 0
    assert "quarantined" in await open_alerts(services, ALICE)
    shown = await quarantine.get(q.id)
    assert shown.headline is not None and shown.headline.subject == "no date"
    assert shown.headline.message_id == mid and shown.email_id is None
    raw = await quarantine.raw(q.id)
    assert raw.endswith(undated(ALICE, "no date", mid)) and len(raw) == q.size

    # not fixed yet: it stays, with the new attempt counted
    again = await quarantine.retry(q.id, by="cli:ops")
    assert (again.outcome, again.code, again.released) == ("quarantined", "store-refused",
                                                          False)
    assert REFUSAL in again.reason
    [q] = await quarantine.messages(mailbox=ALICE)
    assert q.retries == 1 and q.retried_at is not None and q.released_at is None
    assert [o for _, _, o, _ in await links(db, ALICE)] == ["tracked", "quarantined"]

    await accept_undated(db)
    done = await quarantine.retry(q.id, by="cli:ops")
    assert done.outcome == "tracked" and done.email_id is not None and done.released
    found = await activities(db)
    assert [a.message_id for a in found].count(mid) == 1 and len(found) == 2
    tracked = next(a for a in found if a.message_id == mid)
    assert tracked.id == done.email_id and tracked.sent_at is None
    async with db.transaction() as repo:
        [row] = await IncomingStore(repo.session).quarantined(include_released=True)
    assert row.internal_date is not None and tracked.received_at == row.internal_date
    outcomes = {(o, e) for _, _, o, e in await links(db, ALICE)}
    assert ("tracked", done.email_id) in outcomes and "quarantined" not in {o for o, _ in
                                                                            outcomes}
    released = await quarantine.get(q.id)
    assert (released.outcome, released.released_by, released.retries) == ("tracked", "cli:ops",
                                                                           2)
    assert released.released_at is not None and released.email_id == done.email_id
    assert await quarantine.messages(mailbox=ALICE) == []
    assert "quarantined" not in await open_alerts(services, ALICE)  # nothing left: resolved

    # a second retry, and the next sync run, change nothing
    with pytest.raises(RuleViolation) as twice:
        await quarantine.retry(q.id, by="cli:ops")
    assert twice.value.code == "released" and "tracked by cli:ops" in twice.value.message
    assert (await job(db)(ALICE)).items == 0
    assert len(await activities(db)) == 2


async def test_retry_links_to_the_activity_tracked_meanwhile_elsewhere(services: Services,
                                                                      db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all"),
                           own(SUPPORT, owner="support", owner_kind="queue",
                               tracking_rule="all")])
    await refuse_undated(db)
    raw = undated(f"{ALICE}, {SUPPORT}", "to both")
    mid = ts.deliver_lmtp(ALICE, raw)
    assert (await job(db)(ALICE)).failures == 1
    await accept_undated(db)
    ts.deliver_lmtp(SUPPORT, raw)  # the queue's copy arrives after the fix: tracked there
    assert (await job(db)(SUPPORT)).items == 1
    [tracked] = await activities(db)
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=ALICE)
    result = await quarantine.retry(q.id, by="api:ops")
    assert (result.outcome, result.email_id) == ("linked", tracked.id)
    assert [a.message_id for a in await activities(db)] == [mid]  # still one activity
    assert [(o, e) for _, _, o, e in await links(db, ALICE)] == [("linked", tracked.id)]


async def test_two_retries_at_once_make_one_activity(services: Services, db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all")])
    await refuse_undated(db)
    ts.deliver_lmtp(ALICE, undated(ALICE, "double click"))
    await job(db)(ALICE)
    await accept_undated(db)
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=ALICE)
    outcomes = await asyncio.gather(quarantine.retry(q.id, by="ui:a"),
                                    quarantine.retry(q.id, by="ui:b"), return_exceptions=True)
    results = [r for r in outcomes if isinstance(r, RetryResult)]
    refused = [r for r in outcomes if isinstance(r, RuleViolation)]
    assert len(results) == 1 and results[0].outcome == "tracked", outcomes
    assert len(refused) == 1 and refused[0].code == "released", outcomes
    assert len(await activities(db)) == 1


async def test_discard_and_retry_a_whole_mailbox(services: Services, db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all")])
    await refuse_undated(db)
    for subject in ("first", "second", "third"):
        ts.deliver_lmtp(ALICE, undated(ALICE, subject))
    assert (await job(db)(ALICE)).failures == 3
    quarantine = quarantine_of(services)
    newest, middle, oldest = await quarantine.messages(mailbox=ALICE)
    assert newest.id > middle.id > oldest.id

    dropped = await quarantine.discard(middle.id, by="ui:ops")
    assert (dropped.outcome, dropped.released_by) == ("discarded", "ui:ops")
    assert dropped.released_at is not None
    assert [q.id for q in await quarantine.messages(mailbox=ALICE)] == [newest.id, oldest.id]
    everything = await quarantine.messages(mailbox=ALICE, include_released=True)
    assert [q.id for q in everything] == [newest.id, middle.id, oldest.id]
    assert [q.id for q in await quarantine.messages(include_released=True, limit=1,
                                                    before_id=newest.id)] == [middle.id]
    assert "quarantined" in await open_alerts(services, ALICE)  # two are left

    await accept_undated(db)
    results = await quarantine.retry_mailbox(ALICE, by="cli:ops")
    assert [(r.id, r.outcome) for r in results] == [(oldest.id, "tracked"),
                                                    (newest.id, "tracked")]
    assert sorted(a.subject for a in await activities(db)) == ["first", "third"]
    assert "quarantined" not in await open_alerts(services, ALICE)
    assert sorted(o for _, _, o, _ in await links(db, ALICE)) == ["quarantined", "tracked",
                                                                  "tracked"]
    assert await quarantine.retry_mailbox(ALICE, by="cli:ops") == []
    for action in (quarantine.discard(middle.id, by="x"), quarantine.retry(middle.id, by="x")):
        with pytest.raises(RuleViolation, match="discarded by ui:ops"):
            await action
    with pytest.raises(NotFound):
        await quarantine.get(middle.id + 1000)
    with pytest.raises(NotFound):
        await quarantine.messages(mailbox="nobody@example.test")


async def test_loop_guard_quarantine_is_retried_after_the_sender_is_resumed(
        services: Services, db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all")])
    policy = LoopPolicy(threshold=2, minutes=120)
    for i in range(3):
        ts.deliver_lmtp(ALICE, msg(ALICE, f"auto reply {i}", sender="robot@loop.test"))
    assert (await job(db, loop=policy)(ALICE)).failures == 1
    quarantine = Quarantine(db, options=job(db, loop=policy).options)
    [q] = await quarantine.messages()
    assert q.code == "loop-guard"
    still = await quarantine.retry(q.id, by="cli:ops")  # the sender is still paused
    assert (still.outcome, still.code) == ("quarantined", "loop-guard")
    async with db.transaction() as repo:
        await IncomingStore(repo.session).resume_sender("robot@loop.test")
    done = await quarantine.retry(q.id, by="cli:ops")
    assert done.outcome == "tracked"
    assert sorted(a.subject for a in await activities(db)) == [f"auto reply {i}"
                                                               for i in range(3)]


async def test_a_sent_folder_message_is_retried_as_outgoing(services: Services,
                                                          db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="none", track_sent=True)])
    await refuse_undated(db)
    append(ALICE, "Sent", undated("olga@customer.test", "from my phone").replace(
        b"From: Olga <olga@customer.test>", f"From: Alice <{ALICE}>".encode()))
    assert (await job(db)(ALICE)).failures == 1
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=ALICE)
    assert q.sent is True and q.folder == "Sent"
    await accept_undated(db)
    assert (await quarantine.retry(q.id, by="cli:ops")).outcome == "tracked"
    [sent] = await activities(db)
    assert (sent.direction, sent.status, sent.sender_mailbox) == (Direction.OUTGOING,
                                                                  EmailStatus.SENT, ALICE)
    # the server's arrival date (append() sets it), not the time of the retry
    assert sent.received_at == dt.datetime.fromtimestamp(1.7e9, dt.UTC)
