"""Exchange Online (Microsoft Graph) against the loopback Graph server (`tests.fakes.graph_server`).

Verified only against that fake, which answers in the shapes of Microsoft's Graph and
identity platform references. Covers app-only tokens on the wire (client credentials in the
POST body, the bearer token on every call), Test & Enable with each failure mode named by
the reference (bad client secret AADSTS7000215, unknown app, mailbox without Exchange Online,
unknown user, missing application permission, throttling), Retry-After, token refresh, the
incoming job over delta queries with the deltaLink persisted, sendMail, and change
notification subscriptions renewed before expiry.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from serversync import wiring
from serversync.connectors import graph
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
from tests.fakes.graph_server import GraphServer

APP, SECRET = "11111111-2222-3333-4444-555555555555", "graph~Secr3t.value"
BOB, CAROL, GHOST = "bob@contoso.test", "carol@contoso.test", "ghost@contoso.test"


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, SECRET)
    fake.add_user(BOB)
    fake.add_user(CAROL, licensed=False)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def profile_spec(server: GraphServer, **extra: Any) -> dict[str, Any]:
    return {"name": "eo", "kind": "exchange-online", "credential_source": "app",
            "tenant_id": server.tenant, "client_id": APP, "client_secret": SECRET,
            "token_url": server.token_url, "api_url": server.api_url,
            "allow_plaintext": True, **extra}


def model(server: GraphServer) -> Profile:
    return Profile("eo", ServerKind.EXCHANGE_ONLINE, None, credential_source=CredentialSource.APP,
                   tenant_id=server.tenant, client_id=APP, client_secret=Secret(SECRET),
                   token_url=server.token_url, api_url=server.api_url, allow_plaintext=True)


def client(server: GraphServer, address: str = BOB, **kwargs: Any) -> graph.GraphClient:
    profile = model(server)
    box = Mailbox(address, PartyKind.USER, address.split("@")[0], "eo")
    return graph.GraphClient(profile, login_for(profile, box, Channel.INCOMING),
                             ConnectOptions(), **kwargs)


async def setup(services: Services, server: GraphServer, *addresses: str,
                act: bool = True, **profile: Any) -> None:
    boxes = [{"address": a, "owner": a.split("@")[0], "profile": "eo",
              "incoming": "server-side", "outgoing": "server-side",
              "act": "server-side" if act else "none", "approval": "approved",
              "tracking_rule": "all"} for a in addresses]
    directory = [{"kind": "user", "key": b["owner"], "emails": [b["address"]]} for b in boxes]
    await services.apply(validate(Manifest, {"directory": directory,
                                             "profiles": [profile_spec(server, **profile)],
                                             "mailboxes": boxes}))


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS)


# ---------------------------------------------------------------- Test & Enable


async def test_app_only_token_and_bearer_on_the_wire(services: Services,
                                                     server: GraphServer) -> None:
    await setup(services, server, BOB)
    report = await services.test_enable(BOB)
    assert report.ok, report.results
    tokens = [r for r in server.requests if r.path.endswith("/oauth2/v2.0/token")]
    assert tokens
    for request in tokens:
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        form = dict(urllib.parse.parse_qsl(request.body.decode()))
        assert form == {"grant_type": "client_credentials", "client_id": APP,
                        "client_secret": SECRET, "scope": "https://graph.microsoft.com/.default"}
        assert request.path == f"/{server.tenant}/oauth2/v2.0/token"
    calls = [r for r in server.requests if r.path.startswith("/v1.0/")]
    assert {r.path.split("?")[0] for r in calls} >= {
        f"/v1.0/users/{BOB}/mailFolders/inbox", f"/v1.0/users/{BOB}/mailFolders/sentitems",
        f"/v1.0/users/{BOB}/calendar", f"/v1.0/users/{BOB}/contacts",
        f"/v1.0/users/{BOB}/todo/lists"}
    issued = set(server.tokens)
    for request in calls:
        assert request.headers["authorization"].removeprefix("Bearer ") in issued
        assert SECRET not in request.path and SECRET not in request.headers.get(
            "authorization", "")


@pytest.mark.parametrize(("case", "address", "code", "fix_words"), [
    ("bad-secret", BOB, "bad-client-secret", "new secret"),
    ("unknown-app", BOB, "app-not-found", "client_id"),
    ("unlicensed", CAROL, "mailbox-not-enabled", "licence"),
    ("unknown-user", GHOST, "mailbox-not-found", "address"),
    ("no-permission", BOB, "permission-missing", "Mail."),
])
async def test_failure_modes_become_alerts(services: Services, server: GraphServer, case: str,
                                           address: str, code: str, fix_words: str) -> None:
    extra: dict[str, Any] = {}
    if case == "bad-secret":
        extra["client_secret"] = "an-old-secret"
    elif case == "unknown-app":
        extra["client_id"] = "99999999-0000-0000-0000-000000000000"
    elif case == "no-permission":
        server.apps[APP].roles = {"User.Read.All"}
    await setup(services, server, address, act=False, **extra)
    report = await services.test_enable(address)
    assert not report.ok
    assert {r.code for r in report.results} == {code}, report.results
    [alert, *_] = await services.alerts(mailbox=address)
    assert alert.code == code and fix_words in alert.fix
    if case == "no-permission":
        assert "Mail.ReadWrite" in alert.fix or "Mail.Send" in alert.fix


async def test_throttling_honours_retry_after(server: GraphServer) -> None:
    async with client(server, max_wait=1.0) as g:
        server.throttle.append(0.1)
        assert (await g.folder("inbox"))["id"] == "inbox"  # waited 0.1 s, then succeeded
        server.throttle.append(120)
        with pytest.raises(TransientError) as caught:
            await g.folder("inbox")
        assert caught.value.code == "throttled" and caught.value.retry_after == 120
    calls = [r for r in server.requests if r.path.startswith("/v1.0/")]
    assert len(calls) == 3  # 429 → waited → 200; 429 with a long Retry-After → given up


async def test_an_expired_token_is_refreshed_once(server: GraphServer) -> None:
    async with client(server) as g:
        await g.folder("inbox")
        server.expire_tokens()
        await g.folder("inbox")
    token_requests = [r for r in server.requests if r.path.endswith("/token")]
    assert len(token_requests) == 2


# ---------------------------------------------------------------- channels


async def test_incoming_job_follows_delta_links(services: Services, server: GraphServer,
                                                db: Database) -> None:
    await setup(services, server, BOB, act=False)
    assert (await services.test_enable(BOB)).ok
    ids = [f"<graph-{i}@contoso.test>" for i in range(5)]
    for mid in ids:
        server.deliver(BOB, (f"From: Olga <olga@customer.test>\r\nTo: {BOB}\r\n"
                             f"Subject: {mid}\r\nMessage-ID: {mid}\r\n\r\nbody\r\n").encode())
    job = IncomingJob(db, wiring.INCOMING_SOURCES)
    assert (await job(BOB)).items == 5
    before = len(server.requests)
    server.deliver(BOB, (f"From: olga@customer.test\r\nTo: {BOB}\r\nSubject: later\r\n"
                         "Message-ID: <graph-later@contoso.test>\r\n\r\nx\r\n").encode())
    assert (await job(BOB)).items == 1
    deltas = [r.path for r in server.requests[before:] if "/messages/delta" in r.path]
    assert deltas and "$deltatoken=" in urllib.parse.unquote(deltas[0])  # resumed, not restarted
    assert (await job(BOB)).items == 0
    async with db.transaction() as repo:
        found = await EmailStore(repo.session).list(limit=100)
    assert sorted(a.message_id for a in found) == sorted([*ids, "<graph-later@contoso.test>"])


async def test_send_mail_posts_the_mime(server: GraphServer) -> None:
    mime = f"From: {BOB}\r\nTo: x@else.test\r\nSubject: out\r\n\r\nhello\r\n".encode()
    async with client(server) as g:
        await g.send_mime(mime)
    [request] = [r for r in server.requests if r.path.endswith("/sendMail")]
    assert request.method == "POST" and request.path == f"/v1.0/users/{BOB}/sendMail"
    assert request.headers["content-type"] == "text/plain"
    assert base64.b64decode(request.body) == mime
    assert server.sent == [(BOB, mime)]


async def test_subscriptions_are_created_and_renewed_before_expiry(server: GraphServer) -> None:
    now = dt.datetime.now(dt.UTC)
    async with client(server) as g:
        sub = await g.subscribe(g.inbox_resource(), "https://sync.example.test/graph/notify",
                                client_state="opaque-state", now=now)
        assert sub.expires_at - now <= graph.MAIL_SUBSCRIPTION_MAX
        assert not sub.due(now)
        later = sub.expires_at - dt.timedelta(hours=1)
        renewed = [s async for s in graph.renew_due(g, [sub], later)]
    assert len(renewed) == 1 and renewed[0].expires_at > sub.expires_at
    [create] = [json.loads(r.body) for r in server.requests
                if r.path == "/v1.0/subscriptions" and r.method == "POST"]
    assert create["resource"] == f"users/{BOB}/mailFolders('inbox')/messages"
    assert create["clientState"] == "opaque-state"
    patches = [r for r in server.requests if r.method == "PATCH"]
    assert [r.path for r in patches] == [f"/v1.0/subscriptions/{sub.id}"]
    body = json.dumps({"value": [{"clientState": "opaque-state", "resource": "x"},
                                 {"clientState": "forged", "resource": "y"}]}).encode()
    assert [n["resource"] for n in graph.notification_matches(body, "opaque-state")] == ["x"]


async def test_no_secret_in_urls_or_logs(services: Services, server: GraphServer,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await setup(services, server, BOB, CAROL)
    await services.test_enable(BOB)
    await services.test_enable(CAROL)
    tokens = list(server.tokens)
    for secret in (SECRET, *tokens):
        assert all(secret not in r.path for r in server.requests)
        assert all(secret not in record.getMessage() for record in caplog.records)
    for alert in await services.alerts(mailbox=CAROL):
        assert SECRET not in alert.message + alert.fix
