"""The outgoing channel job over EWS (CreateItem) and Microsoft Graph (sendMail).

Verified only against the loopback fakes (`tests.fakes.ews_server`, `tests.fakes.graph_server`),
which answer in the shapes of Microsoft's references, not against a real Exchange. Covers
sending through EWS impersonation and delegation and Graph app-only with the exact wire
requests; throttling then sending; a refused permission disabling the channel with an alert;
one refused message failing alone; and never twice: a process killed right after the server
took a message (``SERVERSYNC_TEST_CRASH_OUTGOING=after-exchange-send``) and rerun after its
lease sends nothing again and records Sent, proved by the Sent Items lookup.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from lxml import etree

from serversync.core.email import EmailStatus
from serversync.core.errors import TransientError
from serversync.core.model import (
    ApprovalStatus,
    Channel,
    ChannelState,
    ChannelStatus,
    CredentialSource,
    Mailbox,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
)
from serversync.core.outgoing import LEASE, CopyState, Phase, RecipientStatus
from serversync.core.secret import Secret
from serversync.services import Services
from serversync.services.outgoing import CRASH_ENV, CRASH_EXIT, Address, NewEmail, OutgoingService
from serversync.services.outgoing_exchange import CRASH_AFTER_SEND
from serversync.services.runs import ChannelRunner
from serversync.store.crypto import encode_key
from serversync.store.db import Database
from serversync.store.outgoing import OutgoingStore
from tests.fakes.ews_server import EwsServer, M, S, T
from tests.fakes.graph_server import GraphServer

SVC, BOB = "svc@corp.test", "bob@corp.test"
PASSWORDS = {SVC: "svc-Secr3t!", BOB: "bob-Secr3t!"}
DAVE, ERIN, FRANK = "dave@customer.test", "erin@customer.test", "frank@customer.test"
APP, APP_SECRET = "11111111-2222-3333-4444-555555555555", "graph~Secr3t.value"
EO_BOB = "bob@contoso.test"
ENABLED = ChannelState(SyncMethod.SERVER_SIDE, True, ChannelStatus.SUCCESS)


@pytest.fixture
def ews_server() -> Iterator[EwsServer]:
    fake = EwsServer().start()
    for address, password in PASSWORDS.items():
        fake.add_user(address, password, mailbox=address != SVC)
    fake.impersonators.add(SVC)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


@pytest.fixture
def graph_server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, APP_SECRET)
    fake.add_user(EO_BOB)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def ews_profile(server: EwsServer, *, impersonation: bool = True) -> Profile:
    return Profile("imp" if impersonation else "deleg", ServerKind.EXCHANGE, None,
                   credential_source=CredentialSource.PROFILE, service_user=SVC,
                   service_secret=Secret(PASSWORDS[SVC]), use_impersonation=impersonation,
                   ews_url=server.url, allow_plaintext=True)


def graph_profile(server: GraphServer) -> Profile:
    return Profile("eo", ServerKind.EXCHANGE_ONLINE, None, credential_source=CredentialSource.APP,
                   tenant_id=server.tenant, client_id=APP, client_secret=Secret(APP_SECRET),
                   token_url=server.token_url, api_url=server.api_url, allow_plaintext=True)


async def add_mailbox(db: Database, profile: Profile, address: str) -> None:
    async with db.transaction() as repo:
        if await repo.find_profile(profile.name) is None:
            await repo.save_profile(profile)
        key = address.split("@")[0]
        await repo.save_party(Party(PartyKind.USER, key, key.title(), (address,)))
        await repo.save_mailbox(Mailbox(address, PartyKind.USER, key, profile.name,
                                        outgoing=ENABLED, approval=ApprovalStatus.APPROVED))


async def new_email(db: Database, sender: str, subject: str = "Quote", **extra: Any) -> int:
    created = await OutgoingService(db).create(NewEmail(
        sender, subject, to=[Address(DAVE, "Dave")], cc=[ERIN], bcc=[FRANK],
        **{"text": "The quote.", **extra}))
    assert created.id is not None
    return created.id


def soap(body: bytes) -> etree._Element:
    return etree.fromstring(body)


def operations(server: EwsServer, name: str) -> list[etree._Element]:
    return [soap(r.body) for r in server.requests if r.body
            and soap(r.body).find(f"{{{S}}}Body/{{{M}}}{name}") is not None]


def impersonated(envelope: etree._Element) -> str | None:
    return envelope.findtext(f"{{{S}}}Header/{{{T}}}ExchangeImpersonation/{{{T}}}ConnectingSID/"
                             f"{{{T}}}PrimarySmtpAddress")


def parse(mime: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(mime, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def later(db: Database, minutes: float) -> OutgoingService:
    """The outgoing job as it runs ``minutes`` from now."""
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    return OutgoingService(db, clock=lambda: moment)


# ---------------------------------------------------------------- sending


async def test_ews_impersonation_sends_and_saves_a_copy(db: Database,
                                                        ews_server: EwsServer) -> None:
    await add_mailbox(db, ews_profile(ews_server), BOB)
    email_id = await new_email(db, BOB)
    summary = await OutgoingService(db)(BOB)
    assert summary.items == 1 and summary.failures == 0 and not summary.more

    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.SENT and state.attempts == 1
    assert state.phase is Phase.DONE and state.sent_copy is CopyState.DONE
    assert state.smtp_reply == "EWS CreateItem SendAndSaveCopy: NoError"
    assert {(r.address, r.status) for r in state.recipients} == {
        (a, RecipientStatus.ACCEPTED) for a in (DAVE, ERIN, FRANK)}

    [create] = operations(ews_server, "CreateItem")
    op = create.find(f"{{{S}}}Body/{{{M}}}CreateItem")
    assert op is not None and op.get("MessageDisposition") == "SendAndSaveCopy"
    saved = op.find(f"{{{M}}}SavedItemFolderId/{{{T}}}DistinguishedFolderId")
    assert saved is not None and saved.get("Id") == "sentitems"
    assert impersonated(create) == BOB
    mime = base64.b64decode(op.findtext(f".//{{{T}}}MimeContent") or "")
    sent = parse(mime)
    assert sent["Message-ID"] == state.message_id
    assert sent["From"] == "Bob <bob@corp.test>" and sent["Sender"] is None
    assert sent["To"] == "Dave <dave@customer.test>" and sent["Cc"] == ERIN
    assert sent["Bcc"] == FRANK  # Exchange takes Bcc from the MIME and strips it on delivery
    authed = [r for r in ews_server.requests if "authorization" in r.headers]
    assert authed and all(r.headers["authorization"] == "Basic " + base64.b64encode(
        f"{SVC}:{PASSWORDS[SVC]}".encode()).decode() for r in authed)
    assert ews_server.sent == [(BOB, mime)]
    [copy] = ews_server.folder_items(BOB, "sentitems")
    assert copy.mime == mime

    before = len(ews_server.requests)
    assert (await OutgoingService(db)(BOB)).items == 0
    assert len(ews_server.requests) == before  # nothing due: no connection at all


async def test_ews_delegation_sends_on_behalf(db: Database, ews_server: EwsServer) -> None:
    ews_server.delegates[BOB] = {SVC}
    await add_mailbox(db, ews_profile(ews_server, impersonation=False), BOB)
    email_id = await new_email(db, BOB)
    assert (await OutgoingService(db)(BOB)).items == 1
    assert (await OutgoingService(db).state(email_id)).status is EmailStatus.SENT

    [create] = operations(ews_server, "CreateItem")
    assert impersonated(create) is None  # DELEGATE access: no impersonation header
    folder = create.find(f".//{{{M}}}SavedItemFolderId/{{{T}}}DistinguishedFolderId")
    assert folder is not None and folder.get("Id") == "sentitems"
    assert folder.findtext(f"{{{T}}}Mailbox/{{{T}}}EmailAddress") == BOB  # the owner's folder
    sent = parse(base64.b64decode(create.findtext(f".//{{{T}}}MimeContent") or ""))
    assert sent["From"] == "Bob <bob@corp.test>" and sent["Sender"] == SVC  # on behalf of
    assert [box for box, _ in ews_server.sent] == [BOB]


async def test_graph_app_only_send_mail(db: Database, graph_server: GraphServer) -> None:
    await add_mailbox(db, graph_profile(graph_server), EO_BOB)
    email_id = await new_email(db, EO_BOB)
    assert (await OutgoingService(db)(EO_BOB)).items == 1
    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.SENT and state.sent_copy is CopyState.DONE
    assert state.smtp_reply == "Graph sendMail: 202 Accepted"

    [token_request] = [r for r in graph_server.requests if r.path.endswith("/token")]
    form = dict(urllib.parse.parse_qsl(token_request.body.decode()))
    assert form["grant_type"] == "client_credentials" and form["client_id"] == APP
    assert form["scope"] == "https://graph.microsoft.com/.default"
    [send] = [r for r in graph_server.requests if r.path.endswith("/sendMail")]
    assert send.method == "POST"
    assert send.path == "/v1.0/users/bob@contoso.test/sendMail"
    assert send.headers["content-type"] == "text/plain"
    assert send.headers["authorization"].startswith("Bearer ")
    assert send.headers["authorization"][7:] in graph_server.tokens
    mime = base64.b64decode(send.body)
    sent = parse(mime)
    assert sent["Message-ID"] == state.message_id and sent["Bcc"] == FRANK
    assert graph_server.sent == [(EO_BOB, mime)]
    for request in graph_server.requests:
        assert APP_SECRET not in request.path
        assert APP_SECRET.encode() not in request.body or request.path.endswith("/token")


# ---------------------------------------------------------------- throttling and refusals


async def test_ews_throttled_then_sent(db: Database, ews_server: EwsServer) -> None:
    await add_mailbox(db, ews_profile(ews_server), BOB)
    email_id = await new_email(db, BOB)
    ews_server.busy_for["CreateItem"] = [90_000]  # ErrorServerBusy, BackOffMilliseconds
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(TransientError) as caught:
        await OutgoingService(db, clock=lambda: now)(BOB)
    assert caught.value.code == "throttled" and caught.value.retry_after == 90
    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 1
    assert state.next_attempt_at == now + dt.timedelta(seconds=90)  # the server's hint
    assert state.last_error_code == "throttled" and ews_server.sent == []

    assert (await OutgoingService(db, clock=lambda: now)(BOB)).items == 0  # not due yet
    assert (await later(db, 2)(BOB)).items == 1
    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.SENT and state.attempts == 2
    assert len(ews_server.sent) == 1


async def test_graph_throttled_then_sent(sqlite_db: Database,
                                         graph_server: GraphServer) -> None:
    await add_mailbox(sqlite_db, graph_profile(graph_server), EO_BOB)
    email_id = await new_email(sqlite_db, EO_BOB)
    graph_server.throttle_for["sendMail"] = [120]  # longer than the connector waits in place
    with pytest.raises(TransientError) as caught:
        await OutgoingService(sqlite_db)(EO_BOB)
    assert caught.value.code == "throttled" and caught.value.retry_after == 120
    state = await OutgoingService(sqlite_db).state(email_id)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 1
    assert graph_server.sent == []
    graph_server.throttle_for["sendMail"] = [0.2]  # a short one is waited out in place
    assert (await later(sqlite_db, 3)(EO_BOB)).items == 1
    assert len(graph_server.sent) == 1
    sends = [r for r in graph_server.requests if r.path.endswith("/sendMail")]
    assert len(sends) == 3  # 429, 429 (waited 0.2 s), 202


async def test_ews_impersonation_refused_disables_the_channel_with_an_alert(
        db: Database, ews_server: EwsServer) -> None:
    await add_mailbox(db, ews_profile(ews_server), BOB)
    email_id = await new_email(db, BOB)
    ews_server.impersonators.clear()
    services = Services(db, {}, {Channel.OUTGOING: OutgoingService(db)})
    run = await ChannelRunner(services).run(BOB, Channel.OUTGOING)
    assert run is not None and run.error_code == "impersonation-refused"
    assert not (await services.get_mailbox(BOB)).outgoing.enabled
    [alert] = await services.alerts(mailbox=BOB)
    assert alert.code == "impersonation-refused" and "ApplicationImpersonation" in alert.fix
    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 0  # untouched
    assert operations(ews_server, "CreateItem") == [] and ews_server.sent == []


async def test_graph_without_mail_send_disables_the_channel_with_an_alert(
        db: Database, graph_server: GraphServer) -> None:
    graph_server.apps[APP].roles = {"Mail.ReadWrite"}  # admin consent lacks Mail.Send
    await add_mailbox(db, graph_profile(graph_server), EO_BOB)
    email_id = await new_email(db, EO_BOB)
    services = Services(db, {}, {Channel.OUTGOING: OutgoingService(db)})
    run = await ChannelRunner(services).run(EO_BOB, Channel.OUTGOING)
    assert run is not None and run.error_code == "permission-missing"
    [alert] = await services.alerts(mailbox=EO_BOB)
    assert "Mail.Send" in alert.fix and not (await services.get_mailbox(EO_BOB)).outgoing.enabled
    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.PENDING_SEND and state.attempts == 0
    assert state.phase is Phase.QUEUED and state.last_error_code == "permission-missing"
    assert graph_server.sent == []


async def test_a_refused_message_fails_alone(sqlite_db: Database, ews_server: EwsServer,
                                             graph_server: GraphServer) -> None:
    await add_mailbox(sqlite_db, ews_profile(ews_server), BOB)
    big = await new_email(sqlite_db, BOB, "big", text="x" * 5000)
    small = await new_email(sqlite_db, BOB, "small")
    ews_server.max_message_bytes = 4000
    summary = await OutgoingService(sqlite_db)(BOB)
    assert summary.items == 1 and summary.failures == 1
    state = await OutgoingService(sqlite_db).state(big)
    assert state.status is EmailStatus.FAILED and "ErrorMessageSizeExceeded" in (
        state.last_error or "")
    assert (await OutgoingService(sqlite_db).state(small)).status is EmailStatus.SENT

    await add_mailbox(sqlite_db, graph_profile(graph_server), EO_BOB)
    graph_server.invalid_recipients.add(ERIN)
    refused = await new_email(sqlite_db, EO_BOB)
    assert (await OutgoingService(sqlite_db)(EO_BOB)).failures == 1
    state = await OutgoingService(sqlite_db).state(refused)
    assert state.status is EmailStatus.FAILED and "ErrorInvalidRecipients" in (
        state.last_error or "")
    assert graph_server.sent == []


# ---------------------------------------------------------------- never twice


_CHILD = """
import asyncio, base64, sys
from serversync.services.outgoing import OutgoingService
from serversync.store.crypto import Keyring
from serversync.store.db import Database

async def main() -> None:
    db = Database(sys.argv[1], Keyring(base64.urlsafe_b64decode(sys.argv[2])))
    await OutgoingService(db)(sys.argv[3])

asyncio.run(main())
"""


def _run_child(db: Database, address: str) -> int:
    env = {**os.environ, CRASH_ENV: CRASH_AFTER_SEND}
    proc = subprocess.run([sys.executable, "-c", _CHILD, db.url, encode_key(db.keyring.primary),
                           address], env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == CRASH_EXIT, proc.stderr.decode()[-2000:]
    return proc.returncode


async def _crash_then_rerun(db: Database, address: str) -> int:
    email_id = await new_email(db, address)
    await asyncio.to_thread(_run_child, db, address)  # killed after the server took it
    state = await OutgoingService(db).state(email_id)
    assert state.status is EmailStatus.SENDING and state.phase is Phase.SUBMITTING
    assert (await OutgoingService(db)(address)).items == 0  # lease still held: left alone
    rerun = later(db, LEASE.total_seconds() / 60 + 1)
    summary = await rerun(address)
    assert "1 recovered" in summary.detail
    await rerun(address)
    state = await rerun.state(email_id)
    assert state.status is EmailStatus.SENT and state.last_error_code == "recovered"
    return email_id


async def test_ews_crash_after_send_never_sends_twice(db: Database,
                                                      ews_server: EwsServer) -> None:
    await add_mailbox(db, ews_profile(ews_server), BOB)
    await _crash_then_rerun(db, BOB)
    assert len(ews_server.sent) == 1
    [find] = operations(ews_server, "FindItem")  # the Sent Items lookup, by Message-ID
    restriction = find.find(f".//{{{M}}}Restriction/{{{T}}}IsEqualTo")
    assert restriction is not None
    uri = restriction.find(f"{{{T}}}FieldURI")
    assert uri is not None and uri.get("FieldURI") == "message:InternetMessageId"
    assert impersonated(find) == BOB


async def test_graph_crash_after_send_never_sends_twice(db: Database,
                                                        graph_server: GraphServer) -> None:
    await add_mailbox(db, graph_profile(graph_server), EO_BOB)
    email_id = await _crash_then_rerun(db, EO_BOB)
    assert len(graph_server.sent) == 1
    message_id = (await OutgoingService(db).state(email_id)).message_id
    [lookup] = [r for r in graph_server.requests
                if r.path.startswith("/v1.0/users/bob@contoso.test/mailFolders/sentitems/messages")]
    query = dict(urllib.parse.parse_qsl(lookup.path.partition("?")[2]))
    assert query["$filter"] == f"internetMessageId eq '{message_id}'"


async def test_interrupted_without_proof_fails_and_is_not_resent(
        sqlite_db: Database, graph_server: GraphServer) -> None:
    await add_mailbox(sqlite_db, graph_profile(graph_server), EO_BOB)
    email_id = await new_email(sqlite_db, EO_BOB)
    now = dt.datetime.now(dt.UTC)
    async with sqlite_db.transaction() as repo:  # a run marked it "submitting", then died
        store = OutgoingStore(repo.session)
        await store.claim(EO_BOB, now, limit=10, lease=LEASE, owner="dead")
        await store.mark_submitting([email_id], now)
    summary = await later(sqlite_db, LEASE.total_seconds() / 60 + 1)(EO_BOB)
    assert summary.failures == 1
    state = await OutgoingService(sqlite_db).state(email_id)
    assert state.status is EmailStatus.FAILED and state.last_error_code == "outcome-unknown"
    assert graph_server.sent == []
    body = json.dumps([r.path for r in graph_server.requests])
    assert "sendMail" not in body
