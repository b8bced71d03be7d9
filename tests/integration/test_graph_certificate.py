"""Graph certificate credentials end to end against the loopback identity platform + Graph.

Verified only against `tests.fakes.graph_server`, whose token endpoint checks the client
assertion the way Microsoft documents it (registered certificate by ``x5t#S256``, signature
verified by PyJWT, ``aud``/``iss``/``sub``/``jti``/``nbf``/``exp``/``iat``). Runs on SQLite
and PostgreSQL; the CLI test on its own SQLite file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from serversync.cli import app as cli_app
from serversync.core.access import Role
from serversync.core.secret import Secret
from serversync.services import Services
from serversync.services.tokens import Tokens
from serversync.store.tables import ProfileRow
from serversync.web.app import create_app
from tests.fakes import certs
from tests.fakes.graph_server import CLIENT_ASSERTION_TYPE, GraphServer
from tests.integration.test_graph import APP, BOB, SECRET, profile_spec, setup

CERT = certs.make()


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, SECRET)
    fake.add_user(BOB)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def token_requests(server: GraphServer) -> list[dict[str, str]]:
    return [dict(urllib.parse.parse_qsl(r.body.decode())) for r in server.requests
            if r.path.endswith("/oauth2/v2.0/token")]


def assert_no_key_material(text: str) -> None:
    for line in CERT.key_pem.splitlines()[1:-1]:
        assert line not in text


async def test_token_request_carries_a_verified_client_assertion(
        services: Services, server: GraphServer, caplog: pytest.LogCaptureFixture) -> None:
    thumbprint = server.register_certificate(APP, CERT.certificate)
    server.apps[APP].secret = None  # the app has no secret at all: only the certificate
    caplog.set_level(logging.DEBUG)
    await setup(services, server, BOB, client_secret=None, client_certificate=CERT.pem)
    report = await services.test_enable(BOB)
    assert report.ok, report.results
    [incoming] = [r for r in report.results if r.channel.value == "incoming"]
    assert "thumbprint" in incoming.summary and "valid until" in incoming.summary

    forms = token_requests(server)
    assert forms
    for request in (r for r in server.requests if r.path.endswith("/token")):
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert request.path == f"/{server.tenant}/oauth2/v2.0/token"
    for form in forms:
        assert set(form) == {"grant_type", "client_id", "client_assertion_type",
                             "client_assertion", "scope"}
        assert form["grant_type"] == "client_credentials" and form["client_id"] == APP
        assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assert form["scope"] == "https://graph.microsoft.com/.default"
    # Each was verified by the fake (signature with the registered certificate, claims).
    assert len(server.assertions) == len(forms)
    jtis = set()
    for header, claims in server.assertions:
        assert header == {"alg": "PS256", "typ": "JWT", "x5t#S256": thumbprint}
        assert claims["aud"] == server.token_url
        assert claims["iss"] == claims["sub"] == APP
        assert claims["nbf"] == claims["iat"] and 0 < claims["exp"] - claims["nbf"] <= 600
        jtis.add(claims["jti"])
    assert len(jtis) == len(forms)  # never reused
    wire = "".join(f"{r.path}{r.headers}{r.body!r}" for r in server.requests)
    assert_no_key_material(wire + caplog.text)


@pytest.mark.parametrize(("case", "code", "fix_words"), [
    ("unregistered", "bad-client-certificate", "Certificates & secrets"),
    ("clock-skew", "client-assertion-expired", "clock"),
    ("expired-here", "client-certificate-expired", "new certificate"),
    ("not-yet-valid", "client-certificate-not-yet-valid", "clock"),
])
async def test_certificate_failures_become_alerts(services: Services, server: GraphServer,
                                                  case: str, code: str, fix_words: str) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = CERT
    if case == "expired-here":
        cert = certs.make(not_before=now - dt.timedelta(days=400),
                          not_after=now - dt.timedelta(hours=1))
    elif case == "not-yet-valid":
        cert = certs.make(not_before=now + dt.timedelta(days=1))
    if case != "unregistered":
        server.register_certificate(APP, cert.certificate)
    if case == "clock-skew":
        server.clock_skew = 3600.0
    await setup(services, server, BOB, act=False, client_secret=None,
                client_certificate=CERT.pem)
    if cert is not CERT:
        # Saved behind the API's back (apply refuses such certificates): as one stored
        # while valid that has since lapsed, or a clock that moved.
        async with services.db.transaction() as repo:
            stored = await repo.get_profile("eo")
            await repo.save_profile(dataclasses.replace(
                stored, client_certificate=Secret(cert.pem)))
    report = await services.test_enable(BOB)
    assert not report.ok
    assert {r.code for r in report.results} == {code}, report.results
    [alert, *_] = await services.alerts(mailbox=BOB)
    assert alert.code == code and fix_words in alert.fix
    assert "\n" not in alert.message
    assert_no_key_material(alert.message + alert.fix)
    if case in ("expired-here", "not-yet-valid"):
        assert token_requests(server) == []  # refused before any request


async def test_stored_encrypted_never_returned_and_swapped_for_the_secret(
        services: Services, server: GraphServer) -> None:
    app = create_app(services)
    admin = (await Tokens(services.db).create("admin", Role.ADMIN)).value
    auth = {"Authorization": f"Bearer {admin}"}
    bodies: list[str] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as http:
        async def call(method: str, url: str, expect: int, **kw: Any) -> Any:
            response = await http.request(method, url, headers=auth, **kw)
            bodies.append(response.text)
            assert response.status_code == expect, response.text
            return response.json()

        spec = {k: v for k, v in profile_spec(server).items() if k != "client_secret"}
        created = await call("POST", "/api/v1/profiles", 201,
                             json={**spec, "client_certificate": CERT.pem})
        assert created["client_certificate"] == "set" and created["client_secret"] == "not set"
        both = await call("POST", "/api/v1/profiles", 422, json={
            **spec, "name": "eo2", "client_secret": SECRET, "client_certificate": CERT.pem})
        assert "client_certificate" in json.dumps(both)
        ref = await call("POST", "/api/v1/profiles", 422, json={
            **spec, "name": "eo3", "client_certificate": {"file": "/etc/passwd"}})
        assert "client_certificate" in json.dumps(ref)
        shown = await call("GET", "/api/v1/profiles/eo", 200)
        assert shown["client_certificate"] == "set"

        async with services.db.transaction() as repo:
            raw = await repo.session.scalar(select(ProfileRow.client_certificate)
                                            .where(ProfileRow.name == "eo"))
        assert raw and "BEGIN" not in raw and CERT.cert_pem.splitlines()[1] not in raw

        # Giving a secret replaces the certificate (and back again).
        swapped = await call("PATCH", "/api/v1/profiles/eo", 200,
                             json={"client_secret": SECRET})
        assert swapped["client_secret"] == "set" and swapped["client_certificate"] == "not set"
        back = await call("PATCH", "/api/v1/profiles/eo", 200,
                          json={"client_certificate": CERT.pem})
        assert back["client_secret"] == "not set" and back["client_certificate"] == "set"
    profile = await services.get_profile("eo")
    assert profile.client_certificate == Secret(CERT.pem) and profile.client_secret is None
    for body in bodies:
        assert_no_key_material(body)
        assert CERT.cert_pem.splitlines()[1] not in body


def test_cli_apply_and_profile_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVERSYNC_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("SERVERSYNC_KEY_FILE", str(tmp_path / "cli.key"))
    monkeypatch.delenv("SERVERSYNC_SECRET_KEY", raising=False)
    cli = CliRunner()
    pem = tmp_path / "graph.pem"
    pem.write_text(CERT.pem)
    profile = {"name": "eo", "kind": "exchange-online", "credential_source": "app",
               "tenant_id": "contoso-tenant", "client_id": APP,
               "client_certificate": {"file": str(pem)}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"profiles": [profile]}))
    applied = cli.invoke(cli_app, ["apply", "-f", str(config), "--json"])
    assert applied.exit_code == 0, applied.stderr
    assert json.loads(applied.stdout)["created"] == ["profile eo"]
    again = cli.invoke(cli_app, ["apply", "-f", str(config), "--json"])
    assert json.loads(again.stdout)["unchanged"] == ["profile eo"]

    config.write_text(yaml.safe_dump({"profiles": [{**profile, "client_secret": "x"}]}))
    both = cli.invoke(cli_app, ["apply", "-f", str(config)])
    assert both.exit_code == 2
    assert "profiles[0].client_certificate: give either client_secret or client_certificate, " \
           "not both" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1

    made = cli.invoke(cli_app, ["profile", "create", "eo2", "--kind", "exchange-online",
                                "--credential-source", "app", "--set", "tenant_id=t",
                                "--set", f"client_id={APP}", "--client-certificate-file",
                                str(pem), "--json"])
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["client_certificate"] == "set"
    shown = cli.invoke(cli_app, ["profile", "show", "eo2", "--json"])
    assert json.loads(shown.stdout)["client_certificate"] == "set"
    missing = cli.invoke(cli_app, ["profile", "update", "eo2", "--client-certificate-file",
                                   str(tmp_path / "nope.pem")])
    assert missing.exit_code == 2 and "client_certificate: cannot read" in missing.stderr
    for result in (applied, again, both, made, shown, missing):
        assert_no_key_material(result.stdout + result.stderr)
