"""Graph certificate credentials: PEM loading, the signed client assertion, validation rules
and the token endpoint's AADSTS codes.

The assertion is checked with PyJWT (an implementation independent of ours) against the shape
in ``tests/fixtures/graph/client-assertion-decoded.json`` (Microsoft's certificate-credentials
page); the token errors go through `oauth.classify_token_error` from the fixtures.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from serversync.connectors import certificates, graph, oauth
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import AuthError, ConfigError
from serversync.core.model import (
    Channel,
    CredentialSource,
    Endpoint,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
)
from serversync.core.rules import login_for, validate_profile
from serversync.core.secret import Secret
from serversync.manifest import ProfileSpec, validate
from tests.fakes import certs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graph"
APP = "11111111-2222-3333-4444-555555555555"
AUD = "https://login.microsoftonline.com/contoso-tenant/oauth2/v2.0/token"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    assert data["source"].startswith("https://learn.microsoft.com/")
    return data


def test_assertion_has_the_documented_header_and_claims_and_verifies() -> None:
    made = certs.make()
    credential = certificates.load(made.pem)
    assertion = credential.assertion(APP, AUD, now=1_800_000_000)
    documented = fixture("client-assertion-decoded.json")

    header = jwt.get_unverified_header(assertion)
    assert set(header) == set(documented["header"])
    assert header["alg"] == "PS256" and header["typ"] == "JWT"
    der = made.certificate.public_bytes(serialization.Encoding.DER)
    assert header["x5t#S256"] == base64.urlsafe_b64encode(
        hashlib.sha256(der).digest()).decode().rstrip("=")

    claims = jwt.decode(assertion, made.certificate.public_key(), algorithms=["PS256"],
                        audience=AUD, options={"verify_exp": False, "verify_nbf": False,
                                               "verify_iat": False})
    assert set(claims) == set(documented["claims"])
    assert claims["iss"] == claims["sub"] == APP and claims["aud"] == AUD
    assert claims["nbf"] == claims["iat"] == 1_800_000_000
    assert 0 < claims["exp"] - claims["nbf"] <= 600
    uuid.UUID(claims["jti"])
    # PSS with a 32-byte salt (RFC 7518 §3.5), not PKCS#1 v1.5 (RS256).
    signing_input, _, signature = assertion.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    public = made.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(raw, signing_input.encode(), padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                  hashes.SHA256())
    with pytest.raises(InvalidSignature):
        public.verify(raw, signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    # A fresh jti every time.
    assert jwt.decode(credential.assertion(APP, AUD), options={"verify_signature": False}
                      )["jti"] != claims["jti"]


def test_a_chain_and_key_in_any_order_load() -> None:
    leaf = certs.make()
    other = certs.make(key=certs.rsa_key(1), common_name="some CA")
    credential = certificates.load(leaf.key_pem + other.cert_pem + leaf.cert_pem)
    assert credential.certificate == leaf.certificate
    assert "serversync graph app" in credential.describe()
    assert credential.sha1_thumbprint in credential.describe()


@pytest.mark.parametrize(("pem", "words"), [
    ("not a pem at all", "holds no PEM certificate"),
    ("cert-only", "holds no PEM private key"),
    ("wrong-key", "the private key does not belong to the certificate"),
    ("encrypted", "encrypted with a passphrase"),
    ("ec", "not an RSA key"),
    ("short", "1024 bits"),
])
def test_unusable_pem_is_refused_naming_the_field(pem: str, words: str) -> None:
    made = certs.make()
    if pem == "cert-only":
        pem = made.cert_pem
    elif pem == "wrong-key":
        pem = made.cert_pem + certs.make(key=certs.rsa_key(1)).key_pem
    elif pem == "encrypted":
        pem = made.cert_pem + certs.rsa_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass")).decode()
    elif pem == "ec":
        pem = certs.make(key=ec.generate_private_key(ec.SECP256R1())).pem
    elif pem == "short":
        pem = certs.make(key=rsa.generate_private_key(65537, 1024)).pem
    with pytest.raises(ConfigError) as caught:
        certificates.load(pem)
    assert caught.value.field == "client_certificate"
    assert str(caught.value.message).startswith("client_certificate: ")
    assert words in caught.value.message and "\n" not in str(caught.value)
    for line in pem.splitlines()[1:-1]:  # no key or certificate material in the error
        assert line not in str(caught.value)


def test_expired_and_not_yet_valid_certificates_are_refused() -> None:
    now = dt.datetime.now(dt.UTC)
    old = certificates.load(certs.make(not_before=now - dt.timedelta(days=400),
                                       not_after=now - dt.timedelta(days=1)).pem)
    with pytest.raises(AuthError) as expired:
        old.check_valid()
    assert expired.value.code == "client-certificate-expired"
    assert "app registration" in expired.value.fix
    future = certificates.load(certs.make(not_before=now + dt.timedelta(days=2)).pem)
    with pytest.raises(AuthError) as early:
        future.check_valid()
    assert early.value.code == "client-certificate-not-yet-valid" and "clock" in early.value.fix
    certificates.load(certs.make().pem).check_valid()  # a current one passes


# ---------------------------------------------------------------- profile rules


def online(**extra: Any) -> Profile:
    values: dict[str, Any] = {"credential_source": CredentialSource.APP,
                              "tenant_id": "contoso-tenant", "client_id": APP, **extra}
    return Profile("eo", ServerKind.EXCHANGE_ONLINE, None, **values)


def test_exactly_one_app_credential() -> None:
    pem = Secret(certs.make().pem)
    validate_profile(online(client_secret=Secret("s")))
    validate_profile(online(client_certificate=pem))
    with pytest.raises(ConfigError) as both:
        validate_profile(online(client_secret=Secret("s"), client_certificate=pem))
    assert str(both.value).startswith("client_certificate: give either client_secret or "
                                      "client_certificate, not both")
    with pytest.raises(ConfigError) as neither:
        validate_profile(online())
    assert neither.value.message == ("client_secret: is required for app (server-to-server) "
                                     "credentials (or client_certificate)")
    gmail = Profile("g", ServerKind.GMAIL, Endpoint("imap.gmail.com", 993),
                    credential_source=CredentialSource.APP, client_id="svc@x.test",
                    client_secret=Secret("key"), client_certificate=pem)
    with pytest.raises(ConfigError) as not_gmail:
        validate_profile(gmail)
    assert not_gmail.value.field == "client_certificate"


def spec(**extra: Any) -> ProfileSpec:
    data = {"name": "eo", "kind": "exchange-online", "credential_source": "app",
            "tenant_id": "contoso-tenant", "client_id": APP, **extra}
    result: ProfileSpec = validate(ProfileSpec, data)
    return result


def test_spec_checks_a_new_certificate_and_swaps_the_credential(tmp_path: Path) -> None:
    made = certs.make()
    pem_file = tmp_path / "graph.pem"
    pem_file.write_text(made.pem)
    with_secret = spec(client_secret="s3cret").to_core()
    assert with_secret.client_secret == Secret("s3cret")

    # Giving the certificate replaces the stored secret (and the other way round).
    switched = spec(client_certificate={"file": str(pem_file)}).to_core(with_secret)
    assert switched.client_secret is None and switched.client_certificate == Secret(
        made.pem.rstrip("\n"))
    kept = spec(description="x").to_core(switched)
    assert kept.client_certificate == switched.client_certificate and kept.client_secret is None
    back = spec(client_secret="other").to_core(switched)
    assert back.client_certificate is None and back.client_secret == Secret("other")

    now = dt.datetime.now(dt.UTC)
    expired = certs.make(not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(
        minutes=1))
    with pytest.raises(ConfigError) as caught:
        spec(client_certificate=expired.pem).to_core()
    assert caught.value.message.startswith("client_certificate: the client certificate "
                                           "expired on")
    with pytest.raises(ConfigError) as garbage:
        spec(client_certificate="-----BEGIN CERTIFICATE-----\nxx\n").to_core()
    assert garbage.value.field == "client_certificate"


# ---------------------------------------------------------------- token errors


@pytest.mark.parametrize(("name", "code", "fix_words"), [
    ("token-error-assertion-signature.json", "bad-client-certificate", "upload"),
    ("token-error-assertion-key-expired.json", "client-certificate-expired", "new certificate"),
    ("token-error-assertion-time-range.json", "client-assertion-expired", "clock"),
])
def test_assertion_errors_say_what_to_fix(name: str, code: str, fix_words: str) -> None:
    data = fixture(name)
    error = oauth.classify_token_error(data["status"], json.dumps(data["body"]).encode(),
                                       what="Graph token")
    assert isinstance(error, AuthError) and error.code == code
    assert fix_words in error.fix
    if code != "client-assertion-expired":  # the clock, not the certificate, is at fault
        assert "client_certificate" in error.fix
    assert "Trace ID" not in error.message and "\n" not in error.message


def test_the_documented_request_form_is_what_we_send() -> None:
    documented = fixture("token-request-certificate.json")["form"]
    made = certs.make()
    profile = online(client_certificate=Secret(made.pem), token_url=AUD)
    box = Mailbox("bob@contoso.test", PartyKind.USER, "bob", "eo")
    client = graph.GraphClient(profile, login_for(profile, box, Channel.INCOMING),
                               ConnectOptions())
    form = client._token_form()
    assert set(form) == set(documented)
    for name in ("client_assertion_type", "scope", "grant_type"):
        assert form[name] == documented[name]
    assert form["client_id"] == APP
    claims = jwt.decode(form["client_assertion"], made.certificate.public_key(),
                        algorithms=["PS256"], audience=AUD)
    assert claims["iss"] == APP

    now = dt.datetime.now(dt.UTC)
    lapsed = online(client_certificate=Secret(certs.make(
        not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(seconds=1)).pem))
    client = graph.GraphClient(lapsed, login_for(lapsed, box, Channel.INCOMING),
                               ConnectOptions())
    with pytest.raises(AuthError) as caught:
        client._token_form()
    assert caught.value.code == "client-certificate-expired"
