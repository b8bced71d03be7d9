"""Incoming email against the real Dovecot (IMAP) on loopback, on SQLite and PostgreSQL.

Test users: alice, carol, support (a queue), delegate (delegation onto carol's INBOX through
an ACL). Covers both credential models and delegation, incremental sync, a crash between
fetch and commit (a subprocess killed by the fault hook) for IMAP and POP3, UIDVALIDITY
change, a folder deleted on the server, the same message in a user's and a queue's mailbox,
Sent-folder tracking of outgoing activities, after-processing, the loop guard, every
tracking rule and correlation path, and the malformed-message corpus. What every backend
must do alike (tracked once, no-change runs, a refused login's alert) is the channel
contract in ``tests/contract``, which runs against these servers too.
"""

from __future__ import annotations

import dataclasses
import email.utils
import imaplib
import os
import subprocess
import sys
from typing import Any

import pytest

from serversync import wiring
from serversync.core.email import (
    CorrelationMethod,
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
    Regarding,
    Role,
)
from serversync.core.model import Channel, TrackingRule
from serversync.core.tokens import make_token
from serversync.core.tracking import LoopPolicy
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.incoming import FAULT_ENV, IncomingJob, IncomingOptions
from serversync.store.crypto import encode_key
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from serversync.store.incoming import IncomingStore
from tests import testservers as ts
from tests.corpus import malformed_corpus

pytestmark = pytest.mark.usefixtures("test_servers")

ALICE, CAROL, SUPPORT = "alice@example.test", "carol@example.test", "support@example.test"
PLAIN = {"host": ts.HOST, "port": ts.IMAP_PORT, "tls": "starttls"}
DIRECTORY: list[dict[str, Any]] = [
    {"kind": "user", "key": "alice", "emails": [ALICE]},
    {"kind": "user", "key": "carol", "emails": [CAROL]},
    {"kind": "queue", "key": "support", "emails": [SUPPORT], "tracking_rule": "all"},
    {"kind": "contact", "key": "c-olga", "emails": ["olga@customer.test"]},
    {"kind": "account", "key": "a-acme", "emails": ["info@acme.test"]},
    {"kind": "lead", "key": "l-lee", "emails": ["lee@prospect.test"]},
    {"kind": "other", "key": "o-partner", "emails": ["partner@vendor.test"]},
    {"kind": "contact", "key": "c-twin1", "emails": ["twin@dup.test"]},
    {"kind": "contact", "key": "c-twin2", "emails": ["twin@dup.test"]},
]
BASE = {"kind": "imap", "incoming": PLAIN, "ca_file": str(ts.CA_FILE)}
PROFILES = [
    {**BASE, "name": "own", "credential_source": "mailbox"},
    {**BASE, "name": "imp", "credential_source": "profile", "service_user": ts.SVC,
     "service_secret": "svc-pw", "use_impersonation": True},
    {**BASE, "name": "master", "credential_source": "profile", "service_user": ts.SVC,
     "service_secret": "svc-pw", "use_impersonation": True,
     "impersonation_method": "master-user"},
    {**BASE, "name": "deleg", "credential_source": "profile", "service_user": ts.DELEGATE,
     "service_secret": "delegate-pw", "use_impersonation": False},
]


def own(address: str, **fields: Any) -> dict[str, Any]:
    return {"address": address, "owner": address.split("@")[0], "profile": "own",
            "incoming": "server-side", "approval": "approved", "allow_credentials": True,
            "secret": ts.password(address), **fields}


def msg(to: str, subject: str, *, sender: str = "olga@customer.test", extra: str = "",
        body: str = "hello", message_id: str | None = None, cc: str = "") -> bytes:
    mid = message_id or email.utils.make_msgid(domain="test.serversync")
    cc_line = f"Cc: {cc}\r\n" if cc else ""
    return (f"From: Sender <{sender}>\r\nTo: {to}\r\n{cc_line}Subject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: {mid}\r\n{extra}"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()


async def setup(services: Services, mailboxes: list[dict[str, Any]],
                settings: dict[str, Any] | None = None) -> None:
    data: dict[str, Any] = {"directory": DIRECTORY, "profiles": PROFILES, "mailboxes": mailboxes}
    if settings is not None:
        data["settings"] = settings
    await services.apply(validate(Manifest, data))
    async with services.db.transaction() as repo:
        for m in mailboxes:
            await repo.set_channel(m["address"], Channel.INCOMING, enabled=True)


def job(db: Database, **options: Any) -> IncomingJob:
    return IncomingJob(db, wiring.INCOMING_SOURCES, options=IncomingOptions(**options))


async def activities(db: Database) -> list[EmailActivity]:
    async with db.transaction() as repo:
        return list(reversed(await EmailStore(repo.session).list(limit=10000)))


async def links(db: Database, address: str) -> list[tuple[str, str, str, int | None]]:
    async with db.transaction() as repo:
        mailbox = await repo.get_mailbox(address)
        assert mailbox.id is not None
        return await IncomingStore(repo.session).links(mailbox.id)


def imap_do(user: str, *commands: tuple[str, ...]) -> None:
    conn = ts.master_login(user)
    try:
        for name, *args in commands:
            typ, data = getattr(conn, name)(*args)
            assert typ == "OK", (name, args, data)
    finally:
        conn.logout()


def append(user: str, folder: str, raw: bytes) -> None:
    conn = ts.master_login(user)
    try:
        typ, data = conn.append(ts.quote(folder), "", imaplib.Time2Internaldate(1.7e9), raw)
        assert typ == "OK", data
    finally:
        conn.logout()


@pytest.fixture(autouse=True)
def _clean() -> None:
    for user in (ALICE, CAROL, SUPPORT):
        ts.reset_mailbox(user)


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS)


# ---------------------------------------------------------------- credential models


@pytest.mark.parametrize("profile", ["own", "imp", "master"])
async def test_incremental_sync_with_each_credential_model(services: Services, db: Database,
                                                           profile: str) -> None:
    mailbox = own(ALICE, tracking_rule="all")
    if profile != "own":
        mailbox = {**mailbox, "profile": profile, "allow_credentials": False}
        mailbox.pop("secret")
    await setup(services, [mailbox])
    first = [ts.deliver_lmtp(ALICE, msg(ALICE, f"first {i}")) for i in range(3)]
    summary = await job(db)(ALICE)
    assert summary.items == 3
    second = ts.deliver_lmtp(ALICE, msg(ALICE, "second"))
    assert (await job(db)(ALICE)).items == 1
    again = await job(db)(ALICE)  # nothing new: one SELECT/EXAMINE, no fetch
    assert again.items == 0
    found = await activities(db)
    assert [a.message_id for a in found] == [*first, second]
    assert all(a.owner == "alice" and a.status is EmailStatus.RECEIVED for a in found)
    assert found[0].recipients[0].party_kind == "contact"  # olga resolved as a contact
    assert len(await links(db, ALICE)) == 4


async def test_delegation_reads_carols_inbox_through_the_acl(services: Services,
                                                             db: Database) -> None:
    ts.set_acl(CAROL, "INBOX", ts.DELEGATE, "lrs")
    await setup(services, [{"address": CAROL, "owner": "carol", "profile": "deleg",
                            "incoming": "server-side", "approval": "approved",
                            "tracking_rule": "all"}])
    mid = ts.deliver_lmtp(CAROL, msg(CAROL, "for carol"))
    assert (await job(db)(CAROL)).items == 1
    [activity] = await activities(db)
    assert activity.message_id == mid and activity.owner == "carol"


# ---------------------------------------------------------------- crash safety


def _crash_run(db: Database, address: str, fault: str) -> tuple[int, str]:
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
    env = {**os.environ, FAULT_ENV: fault}
    proc = subprocess.run([sys.executable, "-c", script, db.url, encode_key(db.keyring.primary),
                           address], env=env, capture_output=True, timeout=60, check=False)
    return proc.returncode, proc.stderr.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("kind", ["imap", "pop3"])
async def test_crash_between_fetch_and_commit_replays_exactly(services: Services, db: Database,
                                                              kind: str) -> None:
    mailbox = own(SUPPORT, owner="support", owner_kind="queue", tracking_rule="all")
    if kind == "pop3":
        await services.apply(validate(Manifest, {"profiles": [
            {"name": "pop", "kind": "pop3", "ca_file": str(ts.CA_FILE),
             "incoming": {"host": ts.HOST, "port": ts.POP3_PORT, "tls": "starttls"},
             "credential_source": "mailbox"}]}))
        mailbox = {**mailbox, "profile": "pop", "after_processing": "delete"}
    await setup(services, [mailbox])
    sent = [ts.deliver_lmtp(SUPPORT, msg(SUPPORT, f"crash {i}")) for i in range(5)]
    # batch 1 (2 messages) commits, the process dies after fetching batch 2
    code, stderr = _crash_run(db, SUPPORT, "incoming-before-commit:2")
    if code == 1 and "server-busy" in stderr:  # a POP3 maildrop lock still held: transient
        code, stderr = _crash_run(db, SUPPORT, "incoming-before-commit:2")
    assert code == 86, stderr
    assert len(await activities(db)) == 2
    summary = await job(db, batch_size=2)(SUPPORT)
    assert summary.items == 3
    again = await job(db, batch_size=2)(SUPPORT)
    assert again.items == 0
    found = await activities(db)
    assert sorted(a.message_id or "" for a in found) == sorted(sent)  # once each
    assert all(a.owner_kind == "queue" and a.owner == "support" for a in found)
    if kind == "pop3":  # processed mail was deleted from the maildrop at QUIT
        conn = ts.master_login(SUPPORT)
        try:
            assert conn.select("INBOX")[1] == [b"0"]
        finally:
            conn.logout()


# ---------------------------------------------------------------- folders


async def test_uidvalidity_change_links_instead_of_duplicating(services: Services,
                                                                db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all", folders=["INBOX", "Projects"])])
    imap_do(ALICE, ("create", ts.quote("Projects")))
    raws = [msg(ALICE, f"project {i}") for i in range(3)]
    for raw in raws:
        append(ALICE, "Projects", raw)
    assert (await job(db)(ALICE)).items == 3
    # the folder is deleted and recreated with the same mail: a new UIDVALIDITY
    imap_do(ALICE, ("delete", ts.quote("Projects")), ("create", ts.quote("Projects")))
    for raw in raws:
        append(ALICE, "Projects", raw)
    summary = await job(db)(ALICE)
    assert summary.items == 0 and "3 linked" in summary.detail
    assert len(await activities(db)) == 3
    remote = [r for f, r, _, _ in await links(db, ALICE) if f == "Projects"]
    assert len(remote) == 6 and len({r.split(":")[0] for r in remote}) == 2


async def test_deleted_folder_is_a_clear_alert_and_the_rest_syncs(services: Services,
                                                                   db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all", folders=["INBOX", "Archive"])])
    imap_do(ALICE, ("create", ts.quote("Archive")))
    ts.deliver_lmtp(ALICE, msg(ALICE, "inbox mail"))
    assert (await job(db)(ALICE)).items == 1
    imap_do(ALICE, ("delete", ts.quote("Archive")))
    ts.deliver_lmtp(ALICE, msg(ALICE, "more inbox mail"))
    summary = await job(db)(ALICE)
    assert summary.items == 1 and summary.failures == 1
    await job(db)(ALICE)  # still missing: the alert is not repeated
    alerts = [a for a in await services.alerts(mailbox=ALICE) if a.code == "folder-missing"]
    assert len(alerts) == 1
    assert "'Archive'" in alerts[0].message and "renamed or deleted" in alerts[0].message
    assert "folder list" in alerts[0].fix
    imap_do(ALICE, ("create", ts.quote("Archive")))
    await job(db)(ALICE)
    assert not [a for a in await services.alerts(mailbox=ALICE) if a.code == "folder-missing"]


# ---------------------------------------------------------------- one activity, many mailboxes


async def test_user_and_queue_on_the_to_line_share_one_activity(services: Services,
                                                                 db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all"),
                           own(SUPPORT, owner="support", owner_kind="queue",
                               tracking_rule="all", after_processing="move",
                               after_processing_folder="Processed")])
    raw = msg(f"{ALICE}, {SUPPORT}", "to both")
    mid = ts.deliver_lmtp(ALICE, raw)
    ts.deliver_lmtp(SUPPORT, raw)
    assert (await job(db)(SUPPORT)).items == 1
    alice = await job(db)(ALICE)
    assert alice.items == 0 and "1 linked" in alice.detail
    [activity] = await activities(db)
    assert activity.message_id == mid and activity.owner_kind == "queue"
    async with db.transaction() as repo:
        assert len(await IncomingStore(repo.session).mailboxes_of(activity.id or 0)) == 2
    conn = ts.master_login(SUPPORT)  # the queue moved its processed copy
    try:
        assert conn.select("INBOX")[1] == [b"0"]
        assert conn.select(ts.quote("Processed"))[1] == [b"1"]
    finally:
        conn.logout()


async def test_sent_folder_recognises_outgoing_activities(services: Services,
                                                          db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="none", track_sent=True)])
    async with db.transaction() as repo:  # what the outgoing engineer's service creates
        outgoing = await EmailStore(repo.session).add(EmailActivity(
            Direction.OUTGOING, EmailStatus.SENT, "quote", ALICE,
            message_id="<out-1@example.test>", sender_mailbox=ALICE))
    append(ALICE, "Sent", msg("olga@customer.test", "quote", sender=ALICE,
                              message_id="<out-1@example.test>"))
    append(ALICE, "Sent", msg("olga@customer.test", "from my phone", sender=ALICE))
    summary = await job(db)(ALICE)
    assert summary.items == 1 and "1 linked" in summary.detail
    found = await activities(db)
    assert len(found) == 2 and found[0].id == outgoing.id
    assert found[1].direction is Direction.OUTGOING and found[1].status is EmailStatus.SENT
    assert found[1].sender_mailbox == ALICE and found[1].owner == "alice"


# ---------------------------------------------------------------- rules and correlation


async def test_every_tracking_rule(services: Services, db: Database) -> None:
    senders = {"contact": "olga@customer.test", "account": "info@acme.test",
               "lead": "lee@prospect.test", "other": "partner@vendor.test",
               "user": CAROL, "unknown": "nobody@nowhere.test", "ambiguous": "twin@dup.test"}
    expected = {
        "all": set(senders),
        "none": set(),
        "contacts-accounts-leads": {"contact", "account", "lead"},
        "email-enabled": {"contact", "account", "lead", "other", "user"},
        "replies": set(),
    }
    await setup(services, [own(ALICE)])
    for rule, wanted in expected.items():
        ts.reset_mailbox(ALICE)
        async with db.transaction() as repo:
            mailbox = await repo.get_mailbox(ALICE)
            assert mailbox.id is not None
            await repo.save_mailbox(dataclasses.replace(mailbox,
                                                        tracking_rule=TrackingRule(rule)))
        tagged = {ts.deliver_lmtp(ALICE, msg(ALICE, f"{rule} {kind}", sender=address)): kind
                  for kind, address in senders.items()}
        before = {a.message_id for a in await activities(db)}
        await job(db)(ALICE)
        new = {tagged[a.message_id] for a in await activities(db)
               if a.message_id in tagged and a.message_id not in before}
        assert new == wanted, rule


async def test_every_correlation_path(services: Services, db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="replies")],
                settings={"use_smart_matching": True})
    async with db.transaction() as repo:
        store = EmailStore(repo.session)
        base = dict(direction=Direction.OUTGOING, status=EmailStatus.SENT, sender=ALICE,
                    owner_kind="user", owner="alice")
        by_id = await store.add(EmailActivity(**base, subject="Offer", message_id="<o1@x>",
                                              regarding=Regarding("account", "a-acme")))
        by_token = await store.add(EmailActivity(**base, subject="Quote"))
        by_conv = await store.add(EmailActivity(**base, subject="Call",
                                                conversation_id="conv-77"))
        by_smart = await store.add(EmailActivity(
            **base, subject="Contract terms", recipients=(
                Recipient(Role.TO, "olga@customer.test"), Recipient(Role.CC, ALICE))))
    token = make_token("SSY", by_token.id or 0)
    replies = {
        ts.deliver_lmtp(ALICE, msg(ALICE, "Re: Offer", extra="In-Reply-To: <o1@x>\r\n")):
            (CorrelationMethod.IN_REPLY_TO, by_id.id),
        ts.deliver_lmtp(ALICE, msg(ALICE, "Re: Offer again",
                                   extra="References: <zz@x> <o1@x>\r\n")):
            (CorrelationMethod.IN_REPLY_TO, by_id.id),
        ts.deliver_lmtp(ALICE, msg(ALICE, f"AW: Quote {token}")):
            (CorrelationMethod.TRACKING_TOKEN, by_token.id),
        ts.deliver_lmtp(ALICE, msg(ALICE, "Re: call", extra="X-Conversation-ID: conv-77\r\n")):
            (CorrelationMethod.CONVERSATION, by_conv.id),
        ts.deliver_lmtp(ALICE, msg(ALICE, "RE: Contract terms")):
            (CorrelationMethod.SMART_MATCHING, by_smart.id),
    }
    unrelated = ts.deliver_lmtp(ALICE, msg(ALICE, "Something new"))
    await job(db)(ALICE)
    found = {a.message_id: a for a in await activities(db)}
    assert unrelated not in found  # "replies" rule: uncorrelated mail is not tracked
    for mid, (method, target) in replies.items():
        assert (found[mid].correlation, found[mid].correlated_to) == (method, target), mid
    first = next(iter(replies))
    assert found[first].regarding is not None and found[first].regarding.key == "a-acme"


async def test_loop_guard_pauses_a_flooding_sender(services: Services, db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all")])
    for i in range(5):
        ts.deliver_lmtp(ALICE, msg(ALICE, f"auto reply {i}", sender="robot@loop.test"))
    summary = await job(db, loop=LoopPolicy(threshold=3, minutes=120))(ALICE)
    assert summary.items == 3 and summary.failures == 2
    codes = {a.code for a in await services.alerts(mailbox=ALICE)}
    assert {"sender-paused", "quarantined"} <= codes
    async with db.transaction() as repo:
        quarantined = await IncomingStore(repo.session).quarantined()
    assert [q.code for q in quarantined] == ["loop-guard", "loop-guard"]


# ---------------------------------------------------------------- bad input


async def test_malformed_corpus_ends_tracked_or_quarantined(services: Services,
                                                            db: Database) -> None:
    await setup(services, [own(ALICE, tracking_rule="all")])
    corpus = malformed_corpus()
    ts.fill_maildir(ALICE, "INBOX", [raw for _, raw in corpus])
    summary = await job(db, batch_size=4)(ALICE)
    outcomes = await links(db, ALICE)
    assert len(outcomes) == len(corpus)  # none lost, none blocked the mailbox
    assert {o for _, _, o, _ in outcomes} <= {"tracked", "quarantined", "linked"}
    assert summary.items + summary.failures + summary.detail.count(" linked") >= len(corpus) - 1
    found = await activities(db)
    big = [a for a in found if any(att.notice for att in a.attachments)]
    assert big and "limit" in big[0].attachments[0].notice  # 50 MB: recorded, not stored
    async with db.transaction() as repo:
        for q in await IncomingStore(repo.session).quarantined():
            assert await IncomingStore(repo.session).raw(q.raw_sha256)  # raw bytes kept


async def test_all_cursors_of_a_mailbox_in_one_read_equal_each_folders_own(
        services: Services, db: Database) -> None:
    """`IncomingStore.cursors` (the runner's prefetch) merges the cursor rows and the sync
    tokens exactly as `cursor` reads them one folder at a time."""
    import datetime as dt

    from serversync.store.exchange import SyncTokens
    from serversync.store.incoming import Cursor
    await setup(services, [own(CAROL)])
    now = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    async with db.transaction() as repo:
        mailbox_id = (await repo.get_mailbox(CAROL)).id
        assert mailbox_id is not None
        store = IncomingStore(repo.session)
        assert await store.cursors(mailbox_id) == {}
        await store.save_cursor(mailbox_id, "INBOX", Cursor(7, 42, 900), now)
        await store.save_cursor(mailbox_id, "Sent", Cursor(8, 3, None, "delta-sent"), now)
        await SyncTokens(repo.session).put(mailbox_id, "incoming", "Archive", "delta-arc", now)
        await SyncTokens(repo.session).put(mailbox_id, "act", "INBOX", "not-incoming", now)
    async with db.transaction() as repo:
        store = IncomingStore(repo.session)
        found = await store.cursors(mailbox_id)
        assert found == {"INBOX": Cursor(7, 42, 900, None), "Sent": Cursor(8, 3, None, "delta-sent"),
                         "Archive": Cursor(None, 0, None, "delta-arc")}
        for folder in ("INBOX", "Sent", "Archive", "Drafts"):
            assert found.get(folder) == await store.cursor(mailbox_id, folder)
