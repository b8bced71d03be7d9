"""SMTP submission (RFC 6409) with aiosmtplib: authenticating as the mailbox's owner.

Own credentials log in as the user; impersonation logs in as the service account with SASL
PLAIN authzid = the user (or a Dovecot master-user name), so the server treats the session
as the user's; delegation logs in as the delegate and sends *on behalf of* the user
(``Sender:`` is the delegate, ``From:`` the user). The probe proves the server will accept
the envelope sender with MAIL FROM / RCPT TO and then RSET: nothing is sent.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosmtplib

from serversync.connectors.net import ConnectOptions, tls_context, translate
from serversync.connectors.protocols import ProbeResult
from serversync.core.errors import AuthError, PermanentError, SyncError, TransientError
from serversync.core.model import AccessMode, Channel, Endpoint, Mailbox, Profile, TlsMode
from serversync.core.rules import Login


def envelope_sender(login: Login) -> str:
    """MAIL FROM: the user, except for delegation, where the delegate sends on behalf."""
    return login.user if login.mode is AccessMode.DELEGATION else login.target


def classify_reply(code: int, message: str, *, sender: str, what: str) -> SyncError:
    """A 4xx is worth retrying; a sender refusal or other 5xx is not."""
    text = f"{code} {message}".strip()
    lowered = message.lower()
    if code in (550, 553, 554) and ("not owned" in lowered or ("sender" in lowered
                                    and "rejected" in lowered)):
        return PermanentError(
            f"the SMTP server refuses {sender} as sender for this login ({text})",
            fix="allow the login to send as this address on the server (e.g. Postfix "
                "smtpd_sender_login_maps), or use the mailbox's own credentials",
            code="sender-not-owned")
    if 400 <= code < 500:
        return TransientError(f"SMTP {what}: temporary failure ({text})", code="smtp-deferred")
    return PermanentError(f"SMTP {what}: refused ({text})", code="smtp-refused")


@asynccontextmanager
async def session(endpoint: Endpoint, login: Login,
                  options: ConnectOptions) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected, authenticated SMTP session; QUIT on exit."""
    client = aiosmtplib.SMTP(
        hostname=endpoint.host, port=endpoint.port, timeout=options.timeout,
        use_tls=endpoint.tls is TlsMode.IMPLICIT,
        start_tls=endpoint.tls is TlsMode.STARTTLS,
        tls_context=tls_context(options.ca_file) if endpoint.tls is not TlsMode.NONE else None)
    try:
        try:
            await client.connect()
        except aiosmtplib.SMTPException as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            if isinstance(cause, aiosmtplib.SMTPResponseException):
                raise classify_reply(cause.code, cause.message, sender="", what="connect") from exc
            raise translate(cause if isinstance(cause, OSError) else exc, endpoint,
                            "SMTP") from exc
        except OSError as exc:
            raise translate(exc, endpoint, "SMTP") from exc
        await authenticate(client, endpoint, login)
        yield client
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


async def authenticate(client: aiosmtplib.SMTP, endpoint: Endpoint, login: Login) -> None:
    secret = login.secret.reveal() if login.secret else ""
    try:
        if login.authzid is not None:
            token = base64.b64encode(f"{login.authzid}\0{login.user}\0{secret}".encode())
            response = await client.execute_command(b"AUTH", b"PLAIN", token)
            if response.code != 235:
                raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)
        else:
            await client.login(login.user, secret)
    except aiosmtplib.SMTPAuthenticationError as exc:
        where = f"{endpoint.host}:{endpoint.port}"
        if 400 <= exc.code < 500:
            raise TransientError(f"SMTP login at {where} deferred ({exc.code} {exc.message})",
                                 code="server-busy") from None
        if login.mode is AccessMode.IMPERSONATION:
            raise AuthError(
                f"SMTP at {where}: service account could not authenticate as {login.target} "
                f"({exc.code} {exc.message})",
                fix="check the service account's password and that the server lets it act "
                    "for users (SASL authorization / master user)",
                code="impersonation-refused") from None
        raise AuthError(f"SMTP at {where}: login of {login.user} was rejected "
                        f"({exc.code} {exc.message})",
                        fix="update the credentials used for outgoing mail",
                        code="auth-failed") from None
    except aiosmtplib.SMTPException as exc:
        raise PermanentError(f"SMTP at {endpoint.host}: cannot authenticate ({exc})",
                             fix="the server offers no usable AUTH mechanism; enable AUTH "
                                 "PLAIN or LOGIN over TLS", code="auth-unavailable") from None


async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    endpoint = profile.outgoing if profile.outgoing is not None else profile.incoming
    assert endpoint is not None
    sender = envelope_sender(login)
    async with session(endpoint, login, options) as client:
        try:
            await client.mail(sender)
            await client.rcpt(mailbox.address)  # our own address: always deliverable
        except aiosmtplib.SMTPResponseException as exc:
            raise classify_reply(exc.code, exc.message, sender=sender, what="probe") from None
        finally:
            if client.is_connected:
                await client.rset()
    mode = "on behalf of" if login.mode is AccessMode.DELEGATION else "as"
    return ProbeResult(f"SMTP ({endpoint.tls.value}) {endpoint.host}:{endpoint.port}: "
                       f"{login.mode.value} login may send {mode} {mailbox.address}")
