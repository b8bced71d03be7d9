"""Gmail / Google Workspace (IMAP + SMTP with XOAUTH2) against loopback Google stand-ins.

Verified only against `tests.fakes.google_server`: a token endpoint that checks the
service account's RS256 signature, audience, delegation grant and subject, and IMAP/SMTP
servers that accept XOAUTH2 with the tokens it issued. Covers the service account with
domain-wide delegation (impersonation), 3-legged refresh tokens per mailbox, the failure
modes (delegation not granted, unknown user, revoked refresh token) and that neither the
private key nor a token appears in a URL or a log line.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from serversync import wiring
from serversync.connectors import gmail
from serversync.connectors.net import ConnectOptions
from serversync.core.email import EmailStatus
from serversync.core.model import (
    Channel,
    CredentialSource,
    Endpoint,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
    TlsMode,
)
from serversync.core.rules import login_for
from serversync.core.secret import Secret
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.outgoing import NewEmail, OutgoingService
from serversync.store.db import Database
from tests.fakes.google_server import SCOPE, GoogleServers, new_service_account_key

SA = "serversync@project.iam.gserviceaccount.test"
ANN, BEN, GHOST = "ann@workspace.test", "ben@workspace.test", "ghost@workspace.test"
CLIENT, CLIENT_SECRET, REFRESH = "web-client.apps.test", "GOCSPX-client-secret", "1//refresh-ben"


@pytest.fixture
def google() -> Iterator[tuple[GoogleServers, str]]:
    servers = GoogleServers().start()
    pem, public = new_service_account_key()
    servers.state.service_accounts[SA] = public
    servers.state.delegated.add(SA)
    servers.state.users |= {ANN, BEN}
    servers.state.clients[CLIENT] = CLIENT_SECRET
    servers.state.refresh_tokens[REFRESH] = BEN
    yield servers, pem
    servers.stop()
    assert not servers.http.errors


def profiles(servers: GoogleServers, pem: str) -> list[dict[str, Any]]:
    base = {"kind": "gmail", "token_url": servers.token_url, "allow_plaintext": True,
            "incoming": {"host": "127.0.0.1", "port": servers.imap_port, "tls": "none"},
            "outgoing": {"host": "127.0.0.1", "port": servers.smtp_port, "tls": "none"}}
    return [{**base, "name": "dwd", "credential_source": "app", "client_id": SA,
             "client_secret": pem},
            {**base, "name": "user-oauth", "credential_source": "mailbox",
             "client_id": CLIENT, "client_secret": CLIENT_SECRET}]


async def setup(services: Services, servers: GoogleServers, pem: str,
                *boxes: dict[str, Any]) -> None:
    mailboxes = [{"owner": b["address"].split("@")[0], "incoming": "server-side",
                  "outgoing": "server-side", "approval": "approved", **b} for b in boxes]
    directory = [{"kind": "user", "key": b["owner"], "emails": [b["address"]]}
                 for b in mailboxes]
    await services.apply(validate(Manifest, {"directory": directory,
                                             "profiles": profiles(servers, pem),
                                             "mailboxes": mailboxes}))


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS)


async def test_service_account_impersonates_each_user(services: Services,
                                                      google: tuple[GoogleServers, str]) -> None:
    servers, pem = google
    await setup(services, servers, pem, {"address": ANN, "profile": "dwd"})
    report = await services.test_enable(ANN)
    assert report.ok, report.results
    assert servers.state.assertions
    for claims in servers.state.assertions:
        assert claims["header"] == {"alg": "RS256", "typ": "JWT"}
        assert (claims["iss"], claims["sub"], claims["scope"], claims["aud"]) == (
            SA, ANN, SCOPE, servers.token_url)
        assert claims["exp"] - claims["iat"] == 3600
    forms = [dict(urllib.parse.parse_qsl(r.body.decode())) for r in servers.requests]
    assert {f["grant_type"] for f in forms} == {"urn:ietf:params:oauth:grant-type:jwt-bearer"}
    assert all(r.path == "/token" for r in servers.requests)
    [imap] = servers.state.imap_auth
    [smtp] = servers.state.smtp_auth
    for sasl in (imap, smtp):
        user, auth, *_ = sasl.split("\x01")
        assert user == f"user={ANN}" and auth.startswith("auth=Bearer ya29.fake-")


async def test_per_user_refresh_token(services: Services,
                                      google: tuple[GoogleServers, str]) -> None:
    servers, pem = google
    await setup(services, servers, pem, {"address": BEN, "profile": "user-oauth",
                                         "allow_credentials": True, "secret": REFRESH})
    report = await services.test_enable(BEN)
    assert report.ok, report.results
    form = dict(urllib.parse.parse_qsl(servers.requests[0].body.decode()))
    assert form == {"grant_type": "refresh_token", "refresh_token": REFRESH,
                    "client_id": CLIENT, "client_secret": CLIENT_SECRET}


@pytest.mark.parametrize(("case", "code"), [
    ("no-delegation", "delegation-not-granted"),
    ("unknown-user", "mailbox-not-found"),
    ("revoked", "token-expired"),
])
async def test_failure_modes_become_alerts(services: Services, google: tuple[GoogleServers, str],
                                           case: str, code: str) -> None:
    servers, pem = google
    box: dict[str, Any] = {"address": ANN, "profile": "dwd"}
    if case == "no-delegation":
        servers.state.delegated.clear()
    elif case == "unknown-user":
        box["address"] = GHOST
    else:
        servers.state.refresh_tokens.clear()
        box = {"address": BEN, "profile": "user-oauth", "allow_credentials": True,
               "secret": REFRESH}
    await setup(services, servers, pem, box)
    report = await services.test_enable(box["address"])
    assert {r.code for r in report.results} == {code}, report.results
    assert (await services.alerts(mailbox=box["address"]))[0].code == code


async def test_incoming_source_logs_in_with_xoauth2(google: tuple[GoogleServers, str]) -> None:
    servers, pem = google
    profile = Profile("dwd", ServerKind.GMAIL, Endpoint("127.0.0.1", servers.imap_port,
                                                        TlsMode.NONE),
                      credential_source=CredentialSource.APP, client_id=SA,
                      client_secret=Secret(pem), token_url=servers.token_url,
                      allow_plaintext=True)
    box = Mailbox(ANN, PartyKind.USER, "ann", "dwd")
    source = wiring.INCOMING_SOURCES[ServerKind.GMAIL](
        profile, box, login_for(profile, box, Channel.INCOMING), ConnectOptions())
    assert isinstance(source, gmail.GmailSource)
    await source.open()
    try:
        assert await source.resolve_folder("INBOX") == "INBOX"
    finally:
        await source.close()
    assert servers.state.imap_auth[0].startswith(f"user={ANN}\x01auth=Bearer ")


async def test_no_key_or_token_in_urls_or_logs(services: Services,
                                               google: tuple[GoogleServers, str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    servers, pem = google
    caplog.set_level(logging.DEBUG)
    await setup(services, servers, pem, {"address": ANN, "profile": "dwd"})
    assert (await services.test_enable(ANN)).ok
    key_line = pem.splitlines()[1]
    for secret in (key_line, *servers.state.tokens):
        assert all(secret not in r.path for r in servers.requests)
        assert all(secret not in record.getMessage() for record in caplog.records), secret


async def test_outgoing_job_sends_with_xoauth2(services: Services, db: Database,
                                               google: tuple[GoogleServers, str]) -> None:
    servers, pem = google
    await setup(services, servers, pem, {"address": ANN, "profile": "dwd"})
    assert (await services.test_enable(ANN)).ok
    outgoing = OutgoingService(db)
    created = await outgoing.create(NewEmail(ANN, "Offer", to=["dave@customer.test"],
                                             text="hello"))
    summary = await outgoing(ANN)
    assert (summary.items, summary.failures) == (1, 0), summary
    [envelope] = servers.state.messages
    assert envelope.mail_from == ANN and envelope.rcpt_tos == ["dave@customer.test"]
    assert f"Message-ID: {created.message_id}".encode() in bytes(envelope.original_content or b"")
    # the SMTP login was XOAUTH2 with a token, never the service account's key as a password
    assert all(a.startswith(f"user={ANN}\x01auth=Bearer ya29.") for a in servers.state.smtp_auth)
    state = await outgoing.state(created.id or 0)
    assert state.status is EmailStatus.SENT
