"""Starting a mailbox user's own Exchange Online sign-in from the REST API (device code flow).

Runs on SQLite and PostgreSQL against the Graph fake (`tests.fakes.graph_server`), which
follows Microsoft's device code page (https://learn.microsoft.com/en-us/entra/
identity-platform/v2-oauth2-device-code; requests in tests/fixtures/graph/device-code-*.json).
The API answers at once; the polling runs in the background of the process that started it,
and the state is read from the database, so any worker (here: a second `SignIns` over the
same database) answers the same and can take over a poller that went silent.

Every response body and every log line is recorded: neither the device code nor any token
may appear in them (the user code is the one thing meant to be shown).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from serversync import wiring
from serversync.connectors.graph import DELEGATED_SCOPE
from serversync.core.access import Role
from serversync.core.secret import Secret
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.admin import connect_options
from serversync.services.consent import SignIns
from serversync.services.tokens import Tokens
from serversync.store.crypto import Keyring, new_key
from serversync.store.db import Database
from serversync.store.sign_ins import SignInRow
from serversync.web.app import create_app
from tests.fakes.graph_server import GraphServer

APP = "99999999-2222-3333-4444-555555555555"  # a public client: no secret
DAN, EVE = "dan@contoso.test", "eve@contoso.test"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "graph"
URL = f"/api/v1/mailboxes/{DAN}/sign-in"


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, None)
    fake.add_user(DAN)
    fake.add_user(EVE)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


@dataclass
class Api:
    client: httpx.AsyncClient
    admin: str
    reader: str
    services: Services
    bodies: list[str] = field(default_factory=list)

    async def call(self, method: str, url: str, *, token: str | None = None,
                   expect: int = 200) -> Any:
        response = await self.client.request(
            method, url, headers={"Authorization": f"Bearer {token or self.admin}"})
        assert response.status_code == expect, (method, url, response.text)
        return response.json()

    async def settled(self, url: str = URL, timeout: float = 20.0) -> dict[str, Any]:
        """GET the sign-in until it is no longer pending (the background poll's outcome)."""
        deadline = time.monotonic() + timeout
        while True:
            state: dict[str, Any] = await self.call("GET", url, token=self.reader)
            if state["status"] != "pending" or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.1)


async def setup(services: Services, server: GraphServer, *, allow: bool = True) -> None:
    await services.apply(validate(Manifest, {
        "directory": [{"kind": "user", "key": "dan", "emails": [DAN]}],
        "profiles": [{"name": "eo-own", "kind": "exchange-online",
                      "credential_source": "mailbox", "tenant_id": server.tenant,
                      "client_id": APP, "token_url": server.token_url,
                      "api_url": server.api_url, "allow_plaintext": True}],
        "mailboxes": [{"address": DAN, "owner": "dan", "profile": "eo-own",
                       "incoming": "server-side", "approval": "approved",
                       "allow_credentials": allow}]}))


@pytest.fixture
async def api(db: Database, server: GraphServer) -> AsyncIterator[Api]:
    services = Services(db, wiring.PROBERS)
    await setup(services, server)
    tokens = Tokens(db)
    admin = (await tokens.create("ops", Role.ADMIN)).value
    reader = (await tokens.create("auditor", Role.READER)).value
    bodies: list[str] = []

    async def record(response: httpx.Response) -> None:
        await response.aread()
        bodies.extend((response.text, str(response.headers)))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(services)),
                                 base_url="http://api",
                                 event_hooks={"response": [record]}) as client:
        yield Api(client, admin, reader, services, bodies)
    await services.sign_ins.stop()


def forms(server: GraphServer, suffix: str) -> list[dict[str, str]]:
    return [dict(urllib.parse.parse_qsl(r.body.decode())) for r in server.requests
            if r.path.endswith(suffix)]


def secrets_seen(server: GraphServer) -> set[str]:
    """Every device code, access token and refresh token the fake handed out."""
    device_codes = {f["device_code"] for f in forms(server, "/token") if "device_code" in f}
    return device_codes | set(server.tokens) | set(server.refresh_tokens)


async def stored_secret(db: Database) -> Secret | None:
    async with db.transaction() as repo:
        return (await repo.get_mailbox(DAN)).secret


def assert_nothing_secret(api: Api, server: GraphServer, logs: str) -> None:
    seen = secrets_seen(server)
    assert seen, "the test never obtained a device code"
    for value in seen:
        assert all(value not in body for body in api.bodies), "a secret in a response"
        assert value not in logs, "a secret in the logs"


async def test_start_then_approve_stores_the_refresh_token(
        api: Api, server: GraphServer, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await api.call("GET", URL, expect=404)  # none started yet
    started = await api.call("POST", URL, expect=202)
    assert set(started) == {"mailbox", "status", "user_code", "verification_uri", "message",
                            "expires_at"}
    assert started["status"] == "pending" and started["mailbox"] == DAN
    assert started["verification_uri"] == "https://microsoft.com/devicelogin"
    assert started["user_code"] in started["message"]
    expires = dt.datetime.fromisoformat(started["expires_at"])
    assert 890 <= (expires - dt.datetime.now(dt.UTC)).total_seconds() <= 900

    # the exact requests Microsoft documents (form keys), with our client id and scope
    documented = json.loads((FIXTURES / "device-code-request.json").read_text())
    [asked] = forms(server, "/devicecode")
    assert set(asked) == set(documented["form"])
    assert asked == {"client_id": APP, "scope": DELEGATED_SCOPE}

    state = await api.call("GET", URL, token=api.reader)  # a reader may read it
    assert state["status"] == "pending" and state["user_code"] == started["user_code"]
    async with db.transaction() as repo:  # the device code is stored encrypted only
        sealed = await repo.session.scalar(select(SignInRow.device_code))
    assert sealed is not None and sealed.startswith("v1:")

    server.approve(started["user_code"], DAN)  # the user signs in on Microsoft's page
    done = await api.settled()
    assert done["status"] == "done" and done["signed_in_as"] == DAN, done
    assert done["error"] is None and done["user_code"] is None  # spent: not shown any more
    assert done["started_by"] == "api:ops" and done["finished_at"]

    polls = forms(server, "/token")
    token_doc = json.loads((FIXTURES / "device-code-token-request.json").read_text())
    assert polls and all(set(p) == set(token_doc["form"]) for p in polls)
    assert {p["grant_type"] for p in polls} == {token_doc["form"]["grant_type"]}
    stored = await stored_secret(db)
    assert stored is not None and stored.reveal() in server.refresh_tokens
    async with db.transaction() as repo:  # forgotten once the sign-in is over
        assert await repo.session.scalar(select(SignInRow.device_code)) is None
    mailbox = await api.call("GET", f"/api/v1/mailboxes/{DAN}")
    assert mailbox["secret"] == "set"
    assert_nothing_secret(api, server, caplog.text)


async def test_declined_and_wrong_user_fail_with_a_fix(
        api: Api, server: GraphServer, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    started = await api.call("POST", URL, expect=202)
    server.decline(started["user_code"])
    declined = await api.settled()
    assert declined["status"] == "failed" and declined["signed_in_as"] is None
    assert declined["error"]["code"] == "sign-in-declined"
    assert "start the sign-in again" in declined["error"]["fix"]

    started = await api.call("POST", URL, expect=202)
    server.approve(started["user_code"], EVE)  # someone else signs in with the code
    wrong = await api.settled()
    assert wrong["status"] == "failed" and wrong["error"]["code"] == "wrong-user"
    assert EVE in wrong["error"]["message"] and DAN in wrong["error"]["fix"]
    assert await stored_secret(db) is None  # nothing stored by a refused sign-in
    assert_nothing_secret(api, server, caplog.text)


async def test_only_an_admin_starts_and_only_where_sign_in_applies(
        api: Api, server: GraphServer) -> None:
    refused = await api.call("POST", URL, token=api.reader, expect=403)
    assert refused["error"]["code"] == "read-only"
    assert not forms(server, "/devicecode")  # Microsoft was never asked
    await setup(api.services, server, allow=False)
    off = await api.call("POST", URL, expect=409)
    assert off["error"]["code"] == "credentials-not-allowed"
    missing = await api.call("POST", "/api/v1/mailboxes/nobody@contoso.test/sign-in",
                             expect=404)
    assert missing["error"]["code"] == "not-found"


async def test_a_new_start_replaces_the_pending_one(api: Api, server: GraphServer,
                                                    db: Database) -> None:
    first = await api.call("POST", URL, expect=202)
    second = await api.call("POST", URL, expect=202)
    assert first["user_code"] != second["user_code"]
    server.approve(second["user_code"], DAN)
    done = await api.settled()
    assert done["status"] == "done"
    stored = await stored_secret(db)
    assert stored is not None and stored.reveal() in server.refresh_tokens


async def test_another_worker_reads_the_state_and_takes_over_a_silent_poller(
        api: Api, server: GraphServer, db: Database) -> None:
    started = await api.call("POST", URL, expect=202)
    await api.services.sign_ins.stop()  # the worker that started it went away
    other = SignIns(db, connect_options)  # another web worker on the same database
    assert (await other.get(DAN)).status.value == "pending"
    assert not other._tasks  # its poller was heard of moments ago: not taken over yet
    async with db.transaction() as repo:
        await repo.session.execute(update(SignInRow).values(
            polled_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)))
    await other.get(DAN)  # silent for long enough: this worker polls from now on
    server.approve(started["user_code"], DAN)
    done = await asyncio.wait_for(other.wait(DAN), 20)
    assert done.status.value == "done" and done.signed_in_as == DAN
    assert (await api.call("GET", URL))["status"] == "done"
    stored = await stored_secret(db)
    assert stored is not None and stored.reveal() in server.refresh_tokens


async def test_a_code_nobody_used_in_time_reads_as_expired(api: Api, server: GraphServer,
                                                           db: Database) -> None:
    await api.call("POST", URL, expect=202)
    await api.services.sign_ins.stop()
    async with db.transaction() as repo:
        await repo.session.execute(update(SignInRow).values(
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    expired = await api.call("GET", URL)
    assert expired["status"] == "expired" and expired["error"]["code"] == "sign-in-expired"
    assert expired["error"]["fix"] == "start the sign-in again"
    async with db.transaction() as repo:
        assert await repo.session.scalar(select(SignInRow.device_code)) is None


async def test_key_rotation_reencrypts_a_pending_device_code(api: Api, server: GraphServer,
                                                             db: Database) -> None:
    started = await api.call("POST", URL, expect=202)
    await api.services.sign_ins.stop()
    rotated = Database(db.url, Keyring(new_key(), [db.keyring.primary]))
    try:
        async with rotated.transaction() as repo:
            assert await repo.reencrypt_all(db.keyring) == 1  # the device code, nothing else
            await repo.session.execute(update(SignInRow).values(
                polled_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)))
        only_new = Database(db.url, Keyring(rotated.keyring.primary))
        try:
            worker = SignIns(only_new, connect_options)
            await worker.get(DAN)  # takes over: decrypts the device code with the new key
            server.approve(started["user_code"], DAN)
            done = await asyncio.wait_for(worker.wait(DAN), 20)
            assert done.status.value == "done"
        finally:
            await only_new.close()
    finally:
        await rotated.close()
