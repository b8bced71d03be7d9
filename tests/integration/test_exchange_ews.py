"""Exchange on-premises (EWS) against the loopback EWS server (`tests.fakes.ews_server`).

Verified only against that fake: it answers with the shapes of Microsoft's EWS reference,
not with a real Exchange. Covers Test & Enable for the three access types and each failure
mode the reference names (impersonation refused, no such mailbox, delegate without rights,
wrong password, throttling with BackOffMilliseconds), the exact SOAP on the wire
(ExchangeImpersonation header, Mailbox element for delegates, SendAndSaveCopy), the
incoming job over SyncFolderItems with its SyncState persisted, and that no password
reaches a URL or a log line.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from lxml import etree

from serversync import wiring
from serversync.connectors import ews
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import TransientError
from serversync.core.model import (
    Channel,
    CredentialSource,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
)
from serversync.core.rules import login_for
from serversync.core.secret import Secret
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.incoming import IncomingJob
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from serversync.store.exchange import SyncTokens
from tests.fakes.ews_server import EwsServer, M, S, T

SVC, BOB, CAROL, NOBODY = ("svc@corp.test", "bob@corp.test", "carol@corp.test",
                           "nobody@corp.test")
PASSWORDS = {SVC: "svc-Secr3t!", BOB: "bob-Secr3t!", CAROL: "carol-Secr3t!"}


@pytest.fixture
def server() -> Iterator[EwsServer]:
    fake = EwsServer().start()
    for address, password in PASSWORDS.items():
        fake.add_user(address, password, mailbox=address != SVC)
    fake.impersonators.add(SVC)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def profiles(server: EwsServer) -> list[dict[str, Any]]:
    base = {"kind": "exchange", "ews_url": server.url, "allow_plaintext": True}
    return [
        {**base, "name": "imp", "credential_source": "profile", "service_user": SVC,
         "service_secret": PASSWORDS[SVC], "use_impersonation": True},
        {**base, "name": "deleg", "credential_source": "profile", "service_user": SVC,
         "service_secret": PASSWORDS[SVC], "use_impersonation": False},
        {**base, "name": "own", "credential_source": "mailbox"},
    ]


def mailbox(address: str, profile: str, *, act: bool = True, **extra: Any) -> dict[str, Any]:
    spec = {"address": address, "owner": address.split("@")[0], "profile": profile,
            "incoming": "server-side", "outgoing": "server-side",
            "act": "server-side" if act else "none", "approval": "approved",
            "tracking_rule": "all", **extra}
    if profile == "own":
        spec.update(allow_credentials=True, secret=PASSWORDS.get(address, "x"))
    return spec


async def setup(services: Services, server: EwsServer, *boxes: dict[str, Any]) -> None:
    directory = [{"kind": "user", "key": b["owner"], "emails": [b["address"]]} for b in boxes]
    await services.apply(validate(Manifest, {"directory": directory,
                                             "profiles": profiles(server),
                                             "mailboxes": list(boxes)}))


def imp_profile(server: EwsServer) -> Profile:
    return Profile("imp", ServerKind.EXCHANGE, None, credential_source=CredentialSource.PROFILE,
                   service_user=SVC, service_secret=Secret(PASSWORDS[SVC]),
                   use_impersonation=True, ews_url=server.url, allow_plaintext=True)


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS)


def soap(body: bytes) -> etree._Element:
    return etree.fromstring(body)


def authed(server: EwsServer) -> list[Any]:
    """SOAP requests that carried credentials (exchangelib's first probe has none)."""
    return [r for r in server.requests if "authorization" in r.headers]


def impersonated(envelope: etree._Element) -> str | None:
    return envelope.findtext(f"{{{S}}}Header/{{{T}}}ExchangeImpersonation/{{{T}}}ConnectingSID/"
                             f"{{{T}}}PrimarySmtpAddress")


# ---------------------------------------------------------------- Test & Enable


async def test_impersonation_enables_every_channel_and_sends_the_header(
        services: Services, server: EwsServer) -> None:
    await setup(services, server, mailbox(BOB, "imp"))
    report = await services.test_enable(BOB)
    assert report.ok, report.results
    assert {r.channel for r in report.results} == set(Channel)
    requests = authed(server)
    assert requests
    for request in requests:
        assert request.headers["authorization"] == "Basic " + base64.b64encode(
            f"{SVC}:{PASSWORDS[SVC]}".encode()).decode()
        assert request.headers["content-type"].startswith("text/xml")
        envelope = soap(request.body)
        assert impersonated(envelope) == BOB
        assert envelope.find(f"{{{S}}}Header/{{{T}}}RequestServerVersion").get(
            "Version") == "Exchange2013_SP1"
        assert request.headers.get("x-anchormailbox") == BOB
    folders = {e.get("Id") for r in requests
               for e in soap(r.body).iter(f"{{{T}}}DistinguishedFolderId")}
    assert {"inbox", "sentitems", "calendar", "contacts", "tasks"} <= folders
    mailbox_state = await services.get_mailbox(BOB)
    assert mailbox_state.incoming.enabled and mailbox_state.act.enabled


async def test_delegation_uses_the_mailbox_element_and_refuses_act(
        services: Services, server: EwsServer) -> None:
    server.delegates[BOB] = {SVC}
    await setup(services, server, mailbox(BOB, "deleg", act=False))
    report = await services.test_enable(BOB)
    assert report.ok, report.results
    for request in authed(server):
        envelope = soap(request.body)
        assert impersonated(envelope) is None  # DELEGATE access: no impersonation header
        for folder in envelope.iter(f"{{{T}}}DistinguishedFolderId"):
            assert folder.findtext(f"{{{T}}}Mailbox/{{{T}}}EmailAddress") == BOB
    # the seed's rule: delegation does not sync appointments, contacts and tasks
    with pytest.raises(Exception, match="delegation"):
        await services.update_mailbox(BOB, {"act": "server-side"})


async def test_own_credentials_log_in_as_the_user(services: Services, server: EwsServer) -> None:
    await setup(services, server, mailbox(CAROL, "own"))
    report = await services.test_enable(CAROL)
    assert report.ok, report.results
    for request in authed(server):
        assert base64.b64decode(request.headers["authorization"][6:]).decode().startswith(
            f"{CAROL}:")
        assert impersonated(soap(request.body)) is None


@pytest.mark.parametrize(("case", "code", "fix_words"), [
    ("impersonation-denied", "impersonation-refused", "ApplicationImpersonation"),
    ("no-mailbox", "mailbox-not-found", "primary SMTP address"),
    ("delegate-without-rights", "delegate-access-denied", "delegate"),
    ("wrong-password", "auth-failed", "service_secret"),
])
async def test_failure_modes_become_alerts(services: Services, server: EwsServer, case: str,
                                           code: str, fix_words: str) -> None:
    address, profile = BOB, "imp"
    if case == "impersonation-denied":
        server.impersonators.clear()
    elif case == "no-mailbox":
        address = NOBODY
    elif case == "delegate-without-rights":
        profile = "deleg"
    else:
        server.passwords[SVC] = "changed-on-the-server"
    await setup(services, server, mailbox(address, profile, act=profile != "deleg"))
    report = await services.test_enable(address)
    assert not report.ok
    assert {r.code for r in report.results} == {code}, report.results
    alerts = await services.alerts(mailbox=address)
    assert alerts and all(a.code == code for a in alerts)
    assert fix_words in alerts[0].fix
    assert not (await services.get_mailbox(address)).incoming.enabled


async def test_throttling_carries_the_back_off_hint(server: EwsServer) -> None:
    profile, box = imp_profile(server), Mailbox(BOB, PartyKind.USER, "bob", "imp")
    client = ews.EwsMailbox(profile, login_for(profile, box, Channel.INCOMING), ConnectOptions())
    try:
        await client.folder_count("inbox")
        server.busy.append(2500)
        with pytest.raises(TransientError) as caught:
            await client.sync("inbox", None)
        assert caught.value.code == "throttled" and caught.value.retry_after == 2.5
        page = await client.sync("inbox", None)  # the next call goes through
        assert page.more is False
    finally:
        await client.close()


# ---------------------------------------------------------------- channels


async def test_incoming_job_syncs_with_the_sync_state(services: Services, server: EwsServer,
                                                      db: Database) -> None:
    await setup(services, server, mailbox(BOB, "imp", act=False))
    assert (await services.test_enable(BOB)).ok
    ids = []
    for i in range(3):
        mid = f"<ews-{i}@corp.test>"
        ids.append(mid)
        server.deliver(BOB, (f"From: Olga <olga@customer.test>\r\nTo: {BOB}\r\n"
                             f"Subject: hello {i}\r\nMessage-ID: {mid}\r\n"
                             "Date: Mon, 05 Jan 2026 10:00:00 +0000\r\n\r\nbody\r\n").encode())
    job = IncomingJob(db, wiring.INCOMING_SOURCES)
    assert (await job(BOB)).items == 3
    async with db.transaction() as repo:
        box = await repo.get_mailbox(BOB)
        assert box.id is not None
        token = await SyncTokens(repo.session).get(box.id, "incoming", "INBOX")
    assert token  # the SyncState is kept with the cursor
    before = len(server.requests)
    server.deliver(BOB, (f"From: olga@customer.test\r\nTo: {BOB}\r\nSubject: later\r\n"
                         "Message-ID: <ews-later@corp.test>\r\n\r\nx\r\n").encode())
    assert (await job(BOB)).items == 1
    syncs = [soap(r.body) for r in server.requests[before:]
             if soap(r.body).find(f"{{{S}}}Body/{{{M}}}SyncFolderItems") is not None]
    assert syncs and syncs[0].findtext(f".//{{{M}}}SyncState") == token
    assert (await job(BOB)).items == 0
    async with db.transaction() as repo:
        found = await EmailStore(repo.session).list(limit=100)
    assert sorted(a.message_id for a in found) == sorted([*ids, "<ews-later@corp.test>"])


async def test_a_stale_sync_state_resyncs_without_duplicates(services: Services,
                                                             server: EwsServer,
                                                             db: Database) -> None:
    await setup(services, server, mailbox(BOB, "imp", act=False))
    assert (await services.test_enable(BOB)).ok
    server.deliver(BOB, b"From: olga@customer.test\r\nSubject: one\r\n"
                        b"Message-ID: <one@corp.test>\r\n\r\nx\r\n")
    job = IncomingJob(db, wiring.INCOMING_SOURCES)
    assert (await job(BOB)).items == 1
    async with db.transaction() as repo:
        box = await repo.get_mailbox(BOB)
        assert box.id is not None
        await SyncTokens(repo.session).put(box.id, "incoming", "INBOX", "bm90LWEtc3RhdGU=",
                                           dt.datetime.now(dt.UTC))
    server.deliver(BOB, b"From: olga@customer.test\r\nSubject: two\r\n"
                        b"Message-ID: <two@corp.test>\r\n\r\nx\r\n")
    assert (await job(BOB)).items == 1  # read again from the start; "one" is known
    async with db.transaction() as repo:
        found = await EmailStore(repo.session).list(limit=100)
    assert sorted(a.message_id for a in found) == ["<one@corp.test>", "<two@corp.test>"]


async def test_send_and_save_copy_on_the_wire(server: EwsServer) -> None:
    profile, box = imp_profile(server), Mailbox(BOB, PartyKind.USER, "bob", "imp")
    client = ews.EwsMailbox(profile, login_for(profile, box, Channel.OUTGOING), ConnectOptions())
    mime = f"From: {BOB}\r\nTo: someone@else.test\r\nSubject: out\r\n\r\nhi\r\n".encode()
    try:
        await client.send(mime)
    finally:
        await client.close()
    [create] = [soap(r.body) for r in authed(server)
                if soap(r.body).find(f"{{{S}}}Body/{{{M}}}CreateItem") is not None]
    op = create.find(f"{{{S}}}Body/{{{M}}}CreateItem")
    assert op is not None and op.get("MessageDisposition") == "SendAndSaveCopy"
    saved = op.find(f"{{{M}}}SavedItemFolderId/{{{T}}}DistinguishedFolderId")
    assert saved is not None and saved.get("Id") == "sentitems"
    assert base64.b64decode(op.findtext(f".//{{{T}}}MimeContent") or "") == mime
    assert impersonated(create) == BOB
    assert server.sent == [(BOB, mime)]
    assert [i.folder for i in server.folder_items(BOB, "sentitems")] == ["sentitems"]


async def test_no_password_in_urls_or_logs(services: Services, server: EwsServer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await setup(services, server, mailbox(BOB, "imp"), mailbox(CAROL, "own"))
    server.passwords[CAROL] = "server-side-change"  # failures log too
    assert (await services.test_enable(BOB)).ok
    assert not (await services.test_enable(CAROL)).ok
    basic = base64.b64encode(f"{SVC}:{PASSWORDS[SVC]}".encode()).decode()
    assert caplog.records, "exchangelib logs at DEBUG; the test needs them"
    for secret in (PASSWORDS[SVC], PASSWORDS[CAROL], basic):
        assert all(secret not in r.path for r in server.requests)
        assert all(secret not in record.getMessage() for record in caplog.records), secret
