"""Outgoing email against the real Postfix + Dovecot (and aiosmtpd for scripted 4xx replies).

Test users: bob (sender, own credentials and via the service account), dave (recipient),
sink (external recipients are rewritten there), heidi (a mailbox that logs in as bob),
erin@other.test (outside the service account's impersonation scope).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email
import email.policy
import email.utils
import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, Session

from serversync import wiring
from serversync.core.email import Attachment, EmailStatus
from serversync.core.errors import PermanentError, TransientError
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
from serversync.core.outgoing import LEASE, CopyState, Phase, Priority, RecipientStatus
from serversync.core.secret import Secret
from serversync.services import Services
from serversync.services.outgoing import CRASH_ENV, CRASH_EXIT, Address, NewEmail, OutgoingService
from serversync.store.crypto import encode_key
from serversync.store.db import Database
from tests.testservers import (
    CA_FILE,
    ERIN,
    HOST,
    IMAP_PORT,
    IMAPS_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    SVC,
    master_login,
    quote,
    reset_mailbox,
    set_acl,
    ssl_context,
    wait_for_message,
)

pytestmark = pytest.mark.servers

BOB, DAVE, HEIDI, SINK = ("bob@example.test", "dave@example.test", "heidi@example.test",
                          "sink@example.test")
OWN = Profile("own", ServerKind.IMAP, incoming=Endpoint(HOST, IMAP_PORT, TlsMode.STARTTLS),
              outgoing=Endpoint(HOST, SUBMISSION_PORT, TlsMode.STARTTLS),
              credential_source=CredentialSource.MAILBOX, ca_file=str(CA_FILE))
CORP = Profile("corp", ServerKind.IMAP, incoming=Endpoint(HOST, IMAPS_PORT, TlsMode.IMPLICIT),
               outgoing=Endpoint(HOST, SUBMISSIONS_PORT, TlsMode.IMPLICIT),
               credential_source=CredentialSource.PROFILE, service_user=SVC,
               service_secret=Secret("svc-pw"), use_impersonation=True,
               impersonation_scope=("@example.test",), ca_file=str(CA_FILE))
ENABLED = ChannelState(SyncMethod.SERVER_SIDE, True, ChannelStatus.SUCCESS)


@pytest.fixture(autouse=True)
def _servers(test_servers: object) -> None:
    """Every test here needs the loopback servers."""


async def add_mailbox(db: Database, profile: Profile, address: str, *,
                      login: str | None = None, enabled: bool = True) -> None:
    own = profile.credential_source is CredentialSource.MAILBOX
    user = login or address
    async with db.transaction() as repo:
        if await repo.find_profile(profile.name) is None:
            await repo.save_profile(profile)
        key = address.split("@")[0]
        await repo.save_party(Party(PartyKind.USER, key, key.title(), (address,)))
        await repo.save_mailbox(Mailbox(
            address, PartyKind.USER, key, profile.name,
            outgoing=ENABLED if enabled else ChannelState(SyncMethod.SERVER_SIDE),
            allow_credentials=own, username=user if own else None,
            secret=Secret(f"{user.split('@')[0]}-pw") if own else None,
            approval=ApprovalStatus.APPROVED))


def count(user: str, message_id: str, folder: str = "INBOX") -> int:
    conn = master_login(user)
    try:
        conn.select(quote(folder), readonly=True)
        typ, data = conn.uid("SEARCH", "HEADER", "Message-ID", quote(message_id))
        assert typ == "OK", data
        return len(data[0].split()) if data and data[0] else 0
    finally:
        conn.logout()


def fetch(user: str, message_id: str, folder: str = "INBOX") -> email.message.EmailMessage:
    uid = wait_for_message(user, message_id, folder)
    conn = master_login(user)
    try:
        conn.select(quote(folder), readonly=True)
        typ, data = conn.uid("FETCH", str(uid), "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(data[0], tuple), data
        msg = email.message_from_bytes(data[0][1], policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg
    finally:
        conn.logout()


def settle(user: str, message_id: str, folder: str = "INBOX") -> int:
    """The number of copies once delivery is over (a duplicate would arrive within ms)."""
    wait_for_message(user, message_id, folder)
    time.sleep(0.5)
    return count(user, message_id, folder)


# ---------------------------------------------------------------- the happy path


async def test_sends_as_owner_with_headers_and_sent_copy(db: Database) -> None:
    await add_mailbox(db, OWN, BOB, enabled=False)
    services = Services(db, wiring.PROBERS)
    report = await services.test_enable(BOB)  # the real SMTP probe enables the channel
    assert report.ok, report
    outgoing = OutgoingService(db)
    parent = await outgoing.create(NewEmail(BOB, "Quote", to=[DAVE], text="first"))
    email_activity = await outgoing.create(NewEmail(
        BOB, "Re: Angebot für Ärzte", to=[Address(DAVE, "Dave Dürr")],
        cc=["friend@gmail.example"], bcc=[HEIDI], text="Grüße\n", html="<p>Grüße</p>",
        attachments=[Attachment("Größe.pdf", "application/pdf", 0, b"%PDF-1.4 test")],
        reply_to_activity=parent.id))
    assert email_activity.status is EmailStatus.PENDING_SEND
    assert email_activity.message_id and email_activity.tracking_token
    assert email_activity.in_reply_to == parent.message_id

    summary = await outgoing(BOB)
    assert (summary.items, summary.failures, summary.more) == (2, 0, False)

    mid = email_activity.message_id
    msg = fetch(DAVE, mid)
    assert msg["Subject"] == f"Re: Angebot für Ärzte {email_activity.tracking_token}"
    assert msg["From"].addresses[0].addr_spec == BOB
    assert str(msg["To"]) == "Dave Dürr <dave@example.test>"
    assert msg["In-Reply-To"] == parent.message_id
    assert "Bcc" not in msg
    assert "Authenticated sender: bob@example.test" in str(msg.get_all("Received"))
    assert [p.get_filename() for p in msg.iter_attachments()] == ["Größe.pdf"]
    assert wait_for_message(HEIDI, mid)  # Bcc delivered
    assert wait_for_message("sink+friend=gmail.example@example.test", mid)  # external Cc
    sent = fetch(BOB, mid, "Sent")
    assert str(sent["Bcc"]) == HEIDI  # the sender's copy shows the Bcc

    state = await outgoing.state(email_activity.id or 0)
    assert state.status is EmailStatus.SENT and state.attempts == 1
    assert state.sent_copy is CopyState.DONE and state.phase is Phase.DONE
    assert {r.address: r.status for r in state.recipients} == {
        DAVE: RecipientStatus.ACCEPTED, "friend@gmail.example": RecipientStatus.ACCEPTED,
        HEIDI: RecipientStatus.ACCEPTED}
    assert state.smtp_reply and "queued as" in state.smtp_reply
    assert (await outgoing(BOB)).items == 0  # nothing is sent twice


async def test_service_account_sends_as_user_in_scope(sqlite_db: Database) -> None:
    await add_mailbox(sqlite_db, CORP, BOB)
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(BOB, "via svc", to=[DAVE], text="hi"))
    assert (await outgoing(BOB)).items == 1
    msg = fetch(DAVE, created.message_id or "")
    # SASL PLAIN authzid=bob authcid=svc: Postfix sees bob as the authenticated sender
    assert "Authenticated sender: bob@example.test" in str(msg.get_all("Received"))
    assert count(BOB, created.message_id or "", "Sent") == 1


async def test_service_account_is_refused_outside_its_scope(sqlite_db: Database) -> None:
    await add_mailbox(sqlite_db, CORP, ERIN)
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(ERIN, "not allowed", to=[DAVE], text="x"))
    with pytest.raises(PermanentError) as raised:
        await outgoing(ERIN)
    assert raised.value.code == "outside-scope" and "impersonation scope" in raised.value.fix
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 0


# ---------------------------------------------------------------- refusals


async def test_user_cannot_send_as_another_user(sqlite_db: Database) -> None:
    """heidi's mailbox logs in as bob: Postfix answers 553 at RCPT; the channel stops."""
    from serversync.services.runs import ChannelRunner

    await add_mailbox(sqlite_db, OWN, HEIDI, login=BOB)
    outgoing = OutgoingService(sqlite_db)
    first = await outgoing.create(NewEmail(HEIDI, "as heidi", to=[DAVE], text="x"))
    second = await outgoing.create(NewEmail(HEIDI, "waits", to=[DAVE], text="y"))
    services = Services(sqlite_db, wiring.PROBERS, jobs={Channel.OUTGOING: outgoing})
    run = await ChannelRunner(services).run(HEIDI, Channel.OUTGOING)
    assert run is not None and run.error_code == "sender-not-owned"
    failed = await outgoing.state(first.id or 0)
    assert failed.status is EmailStatus.FAILED
    assert failed.last_error and "553" in failed.last_error and "not owned" in failed.last_error
    assert (await outgoing.state(second.id or 0)).status is EmailStatus.PENDING_SEND
    async with sqlite_db.transaction() as repo:
        mailbox = await repo.get_mailbox(HEIDI)
        alerts = await repo.list_alerts(mailbox=HEIDI)
    assert not mailbox.outgoing.enabled and mailbox.outgoing.status is ChannelStatus.FAILURE
    assert [a.code for a in alerts] == ["sender-not-owned"]
    assert "smtpd_sender_login_maps" in alerts[0].fix


async def test_wrong_password_fails_the_channel_and_keeps_email_pending(
        sqlite_db: Database) -> None:
    await add_mailbox(sqlite_db, OWN, BOB)
    async with sqlite_db.transaction() as repo:
        mailbox = await repo.get_mailbox(BOB)
        await repo.save_mailbox(dataclasses.replace(mailbox, secret=Secret("wrong")))
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(BOB, "x", to=[DAVE], text="x"))
    with pytest.raises(PermanentError) as raised:
        await outgoing(BOB)
    assert raised.value.code == "auth-failed"
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 0


async def test_5xx_fails_with_the_servers_reason_and_per_recipient_results(
        db: Database) -> None:
    await add_mailbox(db, OWN, BOB)
    outgoing = OutgoingService(db)
    nobody = await outgoing.create(NewEmail(BOB, "to nobody", to=["nobody@example.test"],
                                            text="x"))
    partly = await outgoing.create(NewEmail(BOB, "partly", to=[DAVE, "ghost@example.test"],
                                            text="y"))
    summary = await outgoing(BOB)
    assert (summary.items, summary.failures) == (1, 1)
    failed = await outgoing.state(nobody.id or 0)
    assert failed.status is EmailStatus.FAILED and failed.last_error_code == "smtp-refused"
    assert failed.last_error and "550" in failed.last_error and "nobody@example.test" in \
        failed.last_error
    assert [(r.address, r.status, r.code) for r in failed.recipients] == [
        ("nobody@example.test", RecipientStatus.REJECTED, 550)]
    sent = await outgoing.state(partly.id or 0)
    assert sent.status is EmailStatus.SENT and sent.last_error_code == "recipients-refused"
    assert {r.address: r.status for r in sent.recipients} == {
        DAVE: RecipientStatus.ACCEPTED, "ghost@example.test": RecipientStatus.REJECTED}
    assert settle(DAVE, partly.message_id or "") == 1


# ---------------------------------------------------------------- retries


class _Flaky:
    """aiosmtpd handler: the first DATA gets 451, later ones are accepted."""

    def __init__(self) -> None:
        self.data_calls = 0
        self.accepted: list[bytes] = []

    async def handle_DATA(self, server: SMTPServer, session: Session,
                          envelope: Envelope) -> str:
        self.data_calls += 1
        if self.data_calls == 1:
            return "451 4.3.0 Temporary local problem, try again"
        self.accepted.append(envelope.original_content or b"")
        return "250 2.0.0 Ok: queued"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def flaky_smtp() -> Iterator[tuple[_Flaky, int]]:
    handler, port = _Flaky(), _free_port()
    controller = Controller(handler, hostname=HOST, port=port, auth_require_tls=False,
                            authenticator=lambda *args: AuthResult(success=True))
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


async def test_4xx_retries_with_backoff_then_sends(db: Database,
                                                   flaky_smtp: tuple[_Flaky, int]) -> None:
    handler, port = flaky_smtp
    profile = dataclasses.replace(OWN, name="flaky", allow_plaintext=True,
                                  outgoing=Endpoint(HOST, port, TlsMode.NONE))
    await add_mailbox(db, profile, BOB)
    now = dt.datetime.now(dt.UTC)
    clock = [now]
    outgoing = OutgoingService(db, clock=lambda: clock[0])
    created = await outgoing.create(NewEmail(BOB, "try twice", to=[DAVE], text="x"))

    summary = await outgoing(BOB)
    assert (summary.items, summary.failures) == (0, 0)
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 1
    assert state.next_attempt_at == now + dt.timedelta(minutes=1)
    assert state.last_error_code == "smtp-deferred" and "451" in (state.last_error or "")
    assert (await outgoing(BOB)).items == 0  # not due yet

    clock[0] = now + dt.timedelta(minutes=1, seconds=1)
    assert (await outgoing(BOB)).items == 1
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.SENT and state.attempts == 2
    assert len(handler.accepted) == 1 and (created.message_id or "").encode() in \
        handler.accepted[0]


async def test_unreachable_server_is_a_counted_retry(sqlite_db: Database) -> None:
    profile = dataclasses.replace(OWN, name="down", allow_plaintext=True,
                                  outgoing=Endpoint(HOST, _free_port(), TlsMode.NONE))
    await add_mailbox(sqlite_db, profile, BOB)
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(BOB, "x", to=[DAVE], text="x"))
    with pytest.raises(TransientError) as raised:
        await outgoing(BOB)
    assert raised.value.code == "connection-refused"
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 1
    assert state.next_attempt_at is not None and state.last_error_code == "connection-refused"


# ---------------------------------------------------------------- lifecycle


async def test_send_later_priority_and_cancel(sqlite_db: Database) -> None:
    await add_mailbox(sqlite_db, OWN, BOB)
    outgoing = OutgoingService(sqlite_db, batch_size=1)
    later = await outgoing.create(NewEmail(
        BOB, "later", to=[DAVE], text="x",
        send_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
    low = await outgoing.create(NewEmail(BOB, "low", to=[DAVE], text="x",
                                         priority=Priority.LOW))
    high = await outgoing.create(NewEmail(BOB, "high", to=[DAVE], text="x",
                                          priority=Priority.HIGH))
    doomed = await outgoing.create(NewEmail(BOB, "canceled", to=[DAVE], text="x"))
    await outgoing.cancel(doomed.id or 0)
    summary = await outgoing(BOB)
    assert summary.items == 1 and summary.more  # batch of one: the high one first
    assert (await outgoing.state(high.id or 0)).status is EmailStatus.SENT
    assert (await outgoing.state(low.id or 0)).status is EmailStatus.PENDING_SEND
    summary = await outgoing(BOB)
    assert summary.items == 1 and not summary.more  # "later" is not due
    assert (await outgoing.state(later.id or 0)).status is EmailStatus.PENDING_SEND
    assert (await outgoing.state(doomed.id or 0)).status is EmailStatus.CANCELED
    with pytest.raises(Exception, match="only pending email can be canceled"):
        await outgoing.cancel(high.id or 0)


async def test_disabled_channel_keeps_email_pending(sqlite_db: Database) -> None:
    await add_mailbox(sqlite_db, OWN, BOB, enabled=False)
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(BOB, "x", to=[DAVE], text="x"))
    summary = await outgoing(BOB)
    assert summary.items == 0 and "not enabled" in summary.detail
    assert (await outgoing.state(created.id or 0)).status is EmailStatus.PENDING_SEND


# ---------------------------------------------------------------- never twice


_CHILD = """
import asyncio, base64, sys
from serversync.services.outgoing import OutgoingService
from serversync.store.crypto import Keyring
from serversync.store.db import Database

async def main() -> None:
    db = Database(sys.argv[1], Keyring(base64.urlsafe_b64decode(sys.argv[2])))
    await OutgoingService(db, max_sessions=int(sys.argv[4]))(sys.argv[3])

asyncio.run(main())
"""


def _run_child(db: Database, address: str, crash: str, sessions: int = 4) -> int:
    env = {**os.environ, CRASH_ENV: crash}
    proc = subprocess.run([sys.executable, "-c", _CHILD, db.url, encode_key(db.keyring.primary),
                           address, str(sessions)], env=env, capture_output=True, timeout=60,
                          check=False)
    return proc.returncode


async def _crash_and_rerun(db: Database, crash: str) -> tuple[str, int]:
    await add_mailbox(db, OWN, BOB)
    now = dt.datetime.now(dt.UTC)
    created = await OutgoingService(db).create(NewEmail(BOB, f"crash {crash}", to=[DAVE],
                                                        text="once"))
    assert await asyncio.to_thread(_run_child, db, BOB, crash) == CRASH_EXIT
    # the child died after the server accepted DATA: the activity is still Sending
    rerun = OutgoingService(db, clock=lambda: now + LEASE + dt.timedelta(minutes=1))
    state = await rerun.state(created.id or 0)
    assert state.status is EmailStatus.SENDING and state.phase is Phase.SUBMITTING
    await rerun(BOB)
    await rerun(BOB)
    return created.message_id or "", created.id or 0


async def test_crash_after_data_never_sends_twice(db: Database) -> None:
    message_id, email_id = await _crash_and_rerun(db, "after-data")
    assert settle(DAVE, message_id) == 1
    state = await OutgoingService(db).state(email_id)
    # no proof in the Sent folder: not resent, failed with an honest reason
    assert state.status is EmailStatus.FAILED and state.last_error_code == "outcome-unknown"


async def test_crash_after_sent_copy_is_recovered_as_sent(sqlite_db: Database) -> None:
    message_id, email_id = await _crash_and_rerun(sqlite_db, "after-sent-copy")
    assert settle(DAVE, message_id) == 1
    assert count(BOB, message_id, "Sent") == 1
    state = await OutgoingService(sqlite_db).state(email_id)
    assert state.status is EmailStatus.SENT and state.last_error_code == "recovered"
    assert state.sent_copy is CopyState.DONE


async def test_crash_while_the_next_email_is_journaled_ahead(db: Database) -> None:
    """One session, three emails, killed right after the server accepted the second.

    The third was journaled "submitting" while the second was on the wire (or not yet, if
    the crash beat that commit): either way no email may reach the recipient twice, and
    one that is Failed as "outcome unknown" was delivered at most once.
    """
    await add_mailbox(db, OWN, BOB)
    service = OutgoingService(db)
    emails = [await service.create(NewEmail(BOB, f"ahead crash {i}", to=[DAVE], text="x"))
              for i in range(3)]
    assert await asyncio.to_thread(_run_child, db, BOB, "after-data@2", 1) == CRASH_EXIT
    now = dt.datetime.now(dt.UTC)
    rerun = OutgoingService(db, clock=lambda: now + LEASE + dt.timedelta(minutes=1))
    await rerun(BOB)
    await rerun(BOB)
    wait_for_message(DAVE, emails[1].message_id or "")  # accepted before the crash
    time.sleep(0.5)
    for created in emails:
        state = await rerun.state(created.id or 0)
        delivered = count(DAVE, created.message_id or "")
        assert delivered <= 1, f"{created.subject} delivered {delivered} times"
        assert state.status in (EmailStatus.SENT, EmailStatus.FAILED), state
        if state.status is EmailStatus.FAILED:
            assert state.last_error_code == "outcome-unknown"
        else:
            assert delivered == 1
    assert count(DAVE, emails[1].message_id or "") == 1
    third = await rerun.state(emails[2].id or 0)
    if third.status is EmailStatus.FAILED:  # marked ahead, never sent: the documented cost
        assert count(DAVE, emails[2].message_id or "") == 0


async def test_emails_claimed_by_a_crashed_run_are_put_back_and_sent(
        sqlite_db: Database) -> None:
    from serversync.store.outgoing import OutgoingStore

    await add_mailbox(sqlite_db, OWN, BOB)
    created = await OutgoingService(sqlite_db).create(NewEmail(BOB, "claimed", to=[DAVE],
                                                               text="x"))
    now = dt.datetime.now(dt.UTC)
    async with sqlite_db.transaction() as repo:  # a run that claimed it, then died
        claimed = await OutgoingStore(repo.session).claim(BOB, now, limit=10, lease=LEASE,
                                                          owner="dead")
    assert [c.email_id for c in claimed] == [created.id]
    later = OutgoingService(sqlite_db, clock=lambda: now + LEASE + dt.timedelta(seconds=1))
    summary = await later(BOB)
    assert summary.items == 1 and "1 put back" in summary.detail
    state = await later.state(created.id or 0)
    assert state.status is EmailStatus.SENT and state.attempts == 1
    assert settle(DAVE, created.message_id or "") == 1



# ---------------------------------------------------------------- correlation round trip


def _reply_from_dave(original: email.message.EmailMessage, *, threaded: bool) -> str:
    """dave answers from his own mail client (submission as dave)."""
    reply = email.message.EmailMessage()
    reply["From"], reply["To"] = DAVE, BOB
    reply["Subject"] = f"Re: {original['Subject']}"
    reply["Message-ID"] = email.utils.make_msgid(domain="example.test")
    if threaded:
        reply["In-Reply-To"] = original["Message-ID"]
        reply["References"] = original["Message-ID"]
    reply.set_content("Thanks, agreed.\n\n> quoted text\n")
    with smtplib.SMTP(HOST, SUBMISSION_PORT, timeout=10) as client:
        client.starttls(context=ssl_context())
        client.login(DAVE, "dave-pw")
        client.send_message(reply)
    wait_for_message(BOB, reply["Message-ID"])
    return str(reply["Message-ID"])


async def test_reply_is_correlated_back_by_incoming_sync(sqlite_db: Database) -> None:
    from serversync.core.email import CorrelationMethod
    from serversync.services.incoming import IncomingJob
    from serversync.store.emails import EmailStore

    reset_mailbox(BOB)
    await add_mailbox(sqlite_db, OWN, BOB)
    async with sqlite_db.transaction() as repo:
        mailbox = await repo.get_mailbox(BOB)
        await repo.save_mailbox(dataclasses.replace(mailbox, incoming=ENABLED))
    outgoing = OutgoingService(sqlite_db)
    incoming = IncomingJob(sqlite_db, wiring.INCOMING_SOURCES)
    await incoming(BOB)  # start from an empty INBOX
    first = await outgoing.create(NewEmail(BOB, "Proposal", to=[DAVE], text="Our offer"))
    second = await outgoing.create(NewEmail(BOB, "Invoice", to=[DAVE], text="Attached"))
    assert (await outgoing(BOB)).items == 2

    threaded = _reply_from_dave(fetch(DAVE, first.message_id or ""), threaded=True)
    # a client that drops In-Reply-To: the tracking token in the subject still finds it
    token_only = _reply_from_dave(fetch(DAVE, second.message_id or ""), threaded=False)
    summary = await incoming(BOB)
    assert summary.items == 2, summary
    async with sqlite_db.transaction() as repo:
        emails = EmailStore(repo.session)
        by_header = await emails.find_by_message_id(threaded)
        by_token = await emails.find_by_message_id(token_only)
    assert by_header is not None and by_header.correlated_to == first.id
    assert by_header.correlation is CorrelationMethod.IN_REPLY_TO
    assert by_token is not None and by_token.correlated_to == second.id
    assert by_token.correlation is CorrelationMethod.TRACKING_TOKEN


async def test_delegate_sends_on_behalf_with_sender_header(sqlite_db: Database) -> None:
    """Use Impersonation = No: svc logs in as itself, sends on behalf of bob (Sender: svc),
    and files the copy in bob's Sent folder through the shared namespace (ACL granted)."""
    reset_mailbox(BOB)
    set_acl(BOB, "Sent", SVC, "lrswi")
    delegation = dataclasses.replace(CORP, name="delegation", use_impersonation=False)
    await add_mailbox(sqlite_db, delegation, BOB)
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(BOB, "on behalf", to=[DAVE], text="x"))
    assert (await outgoing(BOB)).items == 1
    msg = fetch(DAVE, created.message_id or "")
    assert msg["From"].addresses[0].addr_spec == BOB
    assert str(msg["Sender"]) == SVC
    assert "Authenticated sender: svc@example.test" in str(msg.get_all("Received"))
    assert count(BOB, created.message_id or "", "Sent") == 1
    assert (await outgoing.state(created.id or 0)).sent_copy is CopyState.DONE
    reset_mailbox(BOB)  # drops the ACL again


async def test_sent_copy_that_failed_is_made_by_the_next_run(sqlite_db: Database) -> None:
    """IMAP down while sending: the email is Sent, its copy pending; the next run makes it."""
    broken = dataclasses.replace(OWN, name="imap-down", allow_plaintext=True,
                                 incoming=Endpoint(HOST, _free_port(), TlsMode.NONE))
    await add_mailbox(sqlite_db, broken, BOB)
    outgoing = OutgoingService(sqlite_db)
    created = await outgoing.create(NewEmail(BOB, "late copy", to=[DAVE], text="x",
                                             bcc=[HEIDI]))
    assert (await outgoing(BOB)).items == 1
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.SENT and state.sent_copy is CopyState.PENDING
    async with sqlite_db.transaction() as repo:  # the administrator fixes the IMAP server
        profile = await repo.get_profile("imap-down")
        await repo.save_profile(dataclasses.replace(profile, incoming=OWN.incoming))
    summary = await outgoing(BOB)
    assert "1 Sent copies made late" in summary.detail
    assert (await outgoing.state(created.id or 0)).sent_copy is CopyState.DONE
    copy = fetch(BOB, created.message_id or "", "Sent")
    assert str(copy["Bcc"]) == HEIDI
    await outgoing(BOB)  # nothing more to copy: never a second copy
    assert count(BOB, created.message_id or "", "Sent") == 1
