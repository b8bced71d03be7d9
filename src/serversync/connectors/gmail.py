"""Gmail / Google Workspace: IMAP and SMTP with SASL XOAUTH2 and OAuth 2.0 access tokens.

Google turned off password logins in 2022, so both protocols authenticate with
``AUTHENTICATE XOAUTH2`` / ``AUTH XOAUTH2`` (Google's "OAuth 2.0 Mechanism" page: the
base64 of ``user=<address>^Aauth=Bearer <token>^A^A``). Where the token comes from follows
the seed's credential sources:

* ``credential_source: app`` — a service account with domain-wide delegation acts *as*
  each user (Google's impersonation): we sign a JWT assertion (RFC 7523, RS256 with the
  ``cryptography`` package) with ``iss`` = the service account (the profile's client_id),
  ``sub`` = the mailbox address, ``scope`` = ``https://mail.google.com/`` and exchange it at
  the token endpoint. The profile's client_secret holds the service account's PEM key.
* ``credential_source: mailbox`` — 3-legged OAuth per mailbox: the mailbox's secret is the
  user's refresh token, exchanged with the profile's OAuth client id and secret.

The token endpoint is ``https://oauth2.googleapis.com/token`` unless the profile overrides
``token_url`` (tests point it at a loopback server). IMAP reuses `connectors.imap.ImapSource`
for everything after login; SMTP reuses `connectors.smtp`'s reply classification.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosmtplib
import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from serversync.connectors import smtp
from serversync.connectors.imap import ImapSource
from serversync.connectors.imapwire import ImapClient
from serversync.connectors.net import ConnectOptions, tls_context
from serversync.connectors.oauth import AccessToken, TokenCache
from serversync.connectors.protocols import ProbeResult
from serversync.connectors.smtp import classify_reply
from serversync.core.errors import AuthError, ConfigError, TransientError
from serversync.core.model import (
    AfterProcessing,
    Channel,
    CredentialSource,
    Endpoint,
    Mailbox,
    Profile,
)
from serversync.core.rules import Login

TOKEN_URL = "https://oauth2.googleapis.com/token"
SCOPE = "https://mail.google.com/"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600  # Google's maximum


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def service_account_assertion(client_email: str, private_key_pem: str, subject: str, *,
                              audience: str, scope: str = SCOPE,
                              now: float | None = None) -> str:
    """A signed JWT for the jwt-bearer grant, acting as ``subject`` (domain-wide delegation)."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("client_secret", "is not a PEM private key of a service account",
                          fix="paste the private_key value of the service account's JSON key") \
            from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("client_secret", "Google service account keys are RSA keys")
    issued = int(now if now is not None else time.time())
    header = {"alg": "RS256", "typ": "JWT"}
    claims = {"iss": client_email, "sub": subject, "scope": scope, "aud": audience,
              "iat": issued, "exp": issued + ASSERTION_LIFETIME_S}
    signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims))
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def token_endpoint(profile: Profile) -> str:
    url = profile.token_url or TOKEN_URL
    if url.startswith("http://") and not profile.allow_plaintext:
        raise ConfigError("token_url", "plain http would send credentials unencrypted",
                          fix="use https, or set allow_plaintext: true to opt in explicitly")
    return url


async def access_token(profile: Profile, login: Login, options: ConnectOptions, *,
                       tokens: TokenCache | None = None) -> AccessToken:
    """An access token for ``login.target``, by the profile's credential source."""
    url = token_endpoint(profile)
    secret = login.secret.reveal() if login.secret else ""
    what = f"Google token for {login.target}"
    if profile.credential_source is CredentialSource.APP:
        assertion = service_account_assertion(profile.client_id or "", secret, login.target,
                                              audience=url)
        form = {"grant_type": JWT_BEARER, "assertion": assertion}
        key: tuple[str, ...] = (url, profile.client_id or "", SCOPE, login.target)
    elif profile.credential_source is CredentialSource.MAILBOX:
        if not profile.client_id or profile.client_secret is None:
            raise ConfigError("client_id", "3-legged Gmail OAuth needs the profile's OAuth "
                                           "client_id and client_secret")
        form = {"grant_type": "refresh_token", "refresh_token": secret,
                "client_id": profile.client_id,
                "client_secret": profile.client_secret.reveal()}
        key = (url, profile.client_id, SCOPE, login.target, "refresh")
    else:
        raise AuthError(f"profile {profile.name!r}: Gmail no longer accepts passwords "
                        "(since May 2022)",
                        fix="use credential_source: app with a service account (domain-wide "
                            "delegation) or mailbox with per-user OAuth refresh tokens",
                        code="auth-unsupported")
    cache = tokens or TokenCache()
    async with httpx.AsyncClient(timeout=options.timeout, verify=tls_context(options.ca_file),
                                 follow_redirects=False) as http:
        return await cache.get(key, http, url, form, what=what)


def xoauth2(user: str, token: str) -> bytes:
    """The SASL XOAUTH2 initial response (base64)."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def source(profile: Profile, mailbox: Mailbox, login: Login,
           options: ConnectOptions) -> GmailSource:
    """The incoming source of a Gmail mailbox (`services.incoming` factory)."""
    readonly = mailbox.after_processing is AfterProcessing.LEAVE and \
        not profile.move_failed_to_folder
    return GmailSource(profile, mailbox, login, options, readonly=readonly)


class GmailSource(ImapSource):
    """`ImapSource` that logs in with XOAUTH2 as the mailbox's user."""

    def __init__(self, profile: Profile, mailbox: Mailbox, login: Login,
                 options: ConnectOptions, *, readonly: bool = True,
                 tokens: TokenCache | None = None) -> None:
        super().__init__(profile, mailbox, login, options, readonly=readonly)
        self.tokens = tokens

    async def open(self) -> None:
        token = await access_token(self.profile, self.login, self.options, tokens=self.tokens)
        await self.client.connect()
        await self.client.xoauth2(self.login.target, token.value.reveal())
        if len(self.client.capabilities) < 3:
            await self.client.command("CAPABILITY")
        enabled = await self.client.enable("QRESYNC", "CONDSTORE")
        self.condstore = bool(enabled & {"QRESYNC", "CONDSTORE"}) or \
            "CONDSTORE" in self.client.capabilities


def smtp_authenticator(profile: Profile, login: Login, options: ConnectOptions, *,
                       tokens: TokenCache | None = None) -> smtp.Authenticator:
    """``AUTH XOAUTH2`` as the mailbox's user, for `connectors.smtp.connect`."""
    cache = tokens or TokenCache()
    endpoint = profile.outgoing or profile.incoming
    assert endpoint is not None
    where = f"{endpoint.host}:{endpoint.port}"

    async def authenticate(client: aiosmtplib.SMTP) -> None:
        token = await access_token(profile, login, options, tokens=cache)
        if client.last_ehlo_response is None:
            await client.ehlo()
        response = await client.execute_command(
            b"AUTH", b"XOAUTH2", xoauth2(login.target, token.value.reveal()))
        if response.code == 334:
            # Google sends a base64 JSON error as a challenge; an empty line ends the exchange.
            response = await client.execute_command(b"")
        if response.code == 235:
            return
        if 400 <= response.code < 500:
            raise TransientError(f"SMTP XOAUTH2 at {where} deferred ({response.code})",
                                 code="server-busy")
        raise AuthError(f"SMTP XOAUTH2 login of {login.target} at {where} was refused "
                        f"({response.code} {response.message})",
                        fix="check the OAuth grant (domain-wide delegation or the user's "
                            "consent) and the https://mail.google.com/ scope",
                        code="auth-failed")
    return authenticate


@asynccontextmanager
async def smtp_session(profile: Profile, login: Login, options: ConnectOptions, *,
                       tokens: TokenCache | None = None) -> AsyncIterator[aiosmtplib.SMTP]:
    """An SMTP session authenticated with XOAUTH2 as the mailbox's user; QUIT on exit."""
    endpoint = profile.outgoing or profile.incoming
    assert endpoint is not None
    client = await smtp.connect(endpoint, login, options,
                                authenticator=smtp_authenticator(profile, login, options,
                                                                 tokens=tokens))
    try:
        yield client
    finally:
        await smtp.close(client)


# ---------------------------------------------------------------- Test & Enable

async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    """IMAP: XOAUTH2 login and EXAMINE INBOX. SMTP: XOAUTH2, MAIL FROM/RCPT TO, RSET."""
    if channel is Channel.INCOMING:
        assert profile.incoming is not None
        token = await access_token(profile, login, options)
        client = ImapClient(profile.incoming, options)
        try:
            await client.connect()
            await client.xoauth2(login.target, token.value.reveal())
            response = await client.select("INBOX")
        finally:
            await client.logout()
        exists = next((line[0] for line in response.lines(b"EXISTS")
                       if isinstance(line[0], bytes)), b"* 0 EXISTS").split()[1].decode()
        return ProbeResult(f"Gmail IMAP {_where(profile.incoming)}: {mailbox.address} via "
                           f"XOAUTH2 ({profile.credential_source.value}): INBOX "
                           f"({exists} messages)")
    endpoint = profile.outgoing or profile.incoming
    assert endpoint is not None
    async with smtp_session(profile, login, options) as smtp:
        try:
            await smtp.mail(login.target)
            await smtp.rcpt(mailbox.address)
        except aiosmtplib.SMTPResponseException as exc:
            raise classify_reply(exc.code, exc.message, sender=login.target,
                                 what="probe") from None
        finally:
            if smtp.is_connected:
                await smtp.rset()
    return ProbeResult(f"Gmail SMTP {_where(endpoint)}: {mailbox.address} via XOAUTH2 may send")


def _where(endpoint: Endpoint) -> str:
    return f"{endpoint.host}:{endpoint.port}"
