"""Exchange Online with each user's own consent (delegated OAuth) against the Graph fake.

Verified only against `tests.fakes.graph_server`, which follows Microsoft's device code
flow and refresh token pages (https://learn.microsoft.com/en-us/entra/identity-platform/
v2-oauth2-device-code, .../refresh-tokens): the device code endpoint beside the token
endpoint, ``authorization_pending`` until the user signs in, a new refresh token on every
refresh (the old one still valid), ``invalid_grant`` AADSTS700082 once it is revoked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serversync import wiring
from serversync.cli import app as cli_app
from serversync.connectors.oauth import REFRESH_TOKENS
from serversync.core.errors import AuthError, RuleViolation
from serversync.core.model import Channel
from serversync.core.secret import Secret
from serversync.core.signin import SignIn
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.incoming import IncomingJob
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from tests.fakes.graph_server import GraphServer

APP = "99999999-2222-3333-4444-555555555555"  # a public client: no secret
DAN, EVE = "dan@contoso.test", "eve@contoso.test"


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, None)
    fake.add_user(DAN)
    fake.add_user(EVE)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS,
                    jobs={Channel.INCOMING: IncomingJob(db, wiring.INCOMING_SOURCES)})


async def setup(services: Services, server: GraphServer, *, allow: bool = True) -> None:
    await services.apply(validate(Manifest, {
        "directory": [{"kind": "user", "key": "dan", "emails": [DAN]}],
        "profiles": [{"name": "eo-own", "kind": "exchange-online",
                      "credential_source": "mailbox", "tenant_id": server.tenant,
                      "client_id": APP, "token_url": server.token_url,
                      "api_url": server.api_url, "allow_plaintext": True}],
        "mailboxes": [{"address": DAN, "owner": "dan", "profile": "eo-own",
                       "incoming": "server-side", "outgoing": "server-side",
                       "act": "server-side", "approval": "approved", "tracking_rule": "all",
                       "allow_credentials": allow}]}))


async def stored_secret(db: Database) -> Secret | None:
    async with db.transaction() as repo:
        return (await repo.get_mailbox(DAN)).secret


async def test_device_sign_in_then_sync_keeps_the_newest_refresh_token(
        services: Services, server: GraphServer, db: Database) -> None:
    await setup(services, server)
    report = await services.test_enable(DAN)
    assert not report.ok and {r.code for r in report.results} == {"credentials-missing"}
    assert "serversync mailbox sign-in dan@contoso.test" in (report.results[0].fix or "")

    shown: list[SignIn] = []

    def on_code(code: SignIn) -> None:
        shown.append(code)
        server.approve(code.user_code, DAN)  # the user signs in on Microsoft's page
    assert await services.sign_in(DAN, on_code) == DAN
    assert shown and shown[0].verification_uri == "https://microsoft.com/devicelogin"
    asked = [r for r in server.requests if r.path.endswith("/devicecode")]
    assert len(asked) == 1 and b"offline_access" in asked[0].body
    first = await stored_secret(db)
    assert first is not None and first.reveal() in server.refresh_tokens

    report = await services.test_enable(DAN)
    assert report.ok, report.results
    assert "with the user's own consent" in report.results[0].summary
    assert server.refresh_uses[0] == first.reveal()
    rotated = await stored_secret(db)
    assert rotated is not None and rotated != first  # the newest one is stored, encrypted
    server.deliver(DAN, (f"From: olga@customer.test\r\nTo: {DAN}\r\nSubject: hi\r\n"
                         "Message-ID: <own-1@contoso.test>\r\n\r\nx\r\n").encode())
    summary = await services.run_channel(DAN, Channel.INCOMING)
    assert summary.items == 1
    assert server.refresh_uses[-1] == rotated.reveal()  # used the newest, not the first
    assert await stored_secret(db) not in (first, rotated)
    async with db.transaction() as repo:
        assert [e.message_id for e in await EmailStore(repo.session).list(limit=5)] == [
            "<own-1@contoso.test>"]
    sent_forms = b"".join(r.body for r in server.requests if r.path.endswith("/token"))
    assert b"client_secret" not in sent_forms  # a public client has none
    assert all(first.reveal() not in r.path for r in server.requests)  # never in a URL


async def test_a_newer_sign_in_is_never_overwritten_by_an_older_rotation(
        services: Services, server: GraphServer, db: Database) -> None:
    await setup(services, server)
    await services.sign_in(DAN, lambda code: server.approve(code.user_code, DAN))
    old = await stored_secret(db)
    assert old is not None
    REFRESH_TOKENS.rotated(DAN, old, Secret("rotated-from-old"))
    await services.sign_in(DAN, lambda code: server.approve(code.user_code, DAN))
    fresh = await stored_secret(db)
    await services.test_enable(DAN)  # saves rotations: the stale one must not win
    now = await stored_secret(db)
    assert now is not None and fresh is not None
    assert now != Secret("rotated-from-old") and now.reveal() in server.refresh_tokens
    assert server.refresh_uses[0] == fresh.reveal()


async def test_sign_in_refusals(services: Services, server: GraphServer, db: Database) -> None:
    await setup(services, server)
    with pytest.raises(AuthError) as wrong:
        await services.sign_in(DAN, lambda code: server.approve(code.user_code, EVE))
    assert wrong.value.code == "wrong-user" and "eve@contoso.test" in wrong.value.message
    with pytest.raises(AuthError) as declined:
        await services.sign_in(DAN, lambda code: server.decline(code.user_code))
    assert declined.value.code == "sign-in-declined"
    assert await stored_secret(db) is None  # nothing stored by a refused sign-in
    await setup(services, server, allow=False)
    with pytest.raises(RuleViolation) as off:
        await services.sign_in(DAN, lambda code: server.approve(code.user_code, DAN))
    assert off.value.code == "credentials-not-allowed"


async def test_a_revoked_sign_in_asks_for_a_new_one(services: Services, server: GraphServer,
                                                    db: Database) -> None:
    await setup(services, server)
    await services.sign_in(DAN, lambda code: server.approve(code.user_code, DAN))
    server.revoke(DAN)
    report = await services.test_enable(DAN)
    assert not report.ok
    result = report.results[0]
    assert result.code == "token-expired" and "sign in again" in (result.fix or "")


def test_cli_sign_in_shows_the_code_and_waits(server: GraphServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVERSYNC_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("SERVERSYNC_KEY_FILE", str(tmp_path / "cli.key"))
    monkeypatch.delenv("SERVERSYNC_SECRET_KEY", raising=False)
    config = tmp_path / "eo.yaml"
    config.write_text(json.dumps({
        "directory": [{"kind": "user", "key": "dan", "emails": [DAN]}],
        "profiles": [{"name": "eo-own", "kind": "exchange-online",
                      "credential_source": "mailbox", "tenant_id": server.tenant,
                      "client_id": APP, "token_url": server.token_url,
                      "api_url": server.api_url, "allow_plaintext": True}],
        "mailboxes": [{"address": DAN, "owner": "dan", "profile": "eo-own",
                       "incoming": "server-side", "allow_credentials": True}]}))
    runner = CliRunner()
    assert runner.invoke(cli_app, ["apply", "-f", str(config)]).exit_code == 0
    stop = threading.Event()

    def user() -> None:  # the user signs in on Microsoft's page while the command waits
        while not stop.wait(0.05):
            pending = list(server.device_sign_ins.values())
            if pending:
                server.approve(pending[0].user_code, DAN)
                return
    helper = threading.Thread(target=user)
    helper.start()
    try:
        result = runner.invoke(cli_app, ["mailbox", "sign-in", DAN])
    finally:
        stop.set()
        helper.join()
    assert result.exit_code == 0, result.stderr
    assert "https://microsoft.com/devicelogin and enter the code F" in result.stdout
    assert f"signed in as {DAN}" in result.stdout
    shown = json.loads(runner.invoke(cli_app, ["mailbox", "show", DAN, "--json"]).stdout)
    assert shown["secret"] == "set"
