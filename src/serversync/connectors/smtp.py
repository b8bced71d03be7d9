"""SMTP submission (RFC 6409) with aiosmtplib: authenticating as the mailbox's owner.

Own credentials log in as the user; impersonation logs in as the service account with SASL
PLAIN authzid = the user (or a Dovecot master-user name), so the server treats the session
as the user's; delegation logs in as the delegate and sends *on behalf of* the user
(``Sender:`` is the delegate, ``From:`` the user). The probe proves the server will accept
the envelope sender with MAIL FROM / RCPT TO and then RSET: nothing is sent.

Sending (`submit`) runs one mail transaction on an open session and reports what the server
said per recipient. Its errors tell the send pipeline what to do: `MessageDeferred` (4xx,
retry later), `MessageRefused` (5xx, the email fails with the server's reason), a
`PermanentError` with code ``sender-not-owned`` (the login may not use this sender: the
whole channel stops), `TransientError` (the connection broke before DATA: safe to retry)
and `OutcomeUnknown` (the connection broke during DATA: the server may have the message, so
it must not be sent again blindly). Postfix refuses a foreign sender at RCPT, not at MAIL
FROM (``smtpd_delay_reject``), so RCPT replies are classified too.

Pipelining (RFC 2920): aiosmtplib does not pipeline, and its protocol object keeps only one
pending reply, so writing MAIL, RCPT and DATA at once would lose replies. The send pipeline
therefore submits through `connectors.smtppipeline` (same errors, one round trip for the
envelope); this module serves the probe, XOAUTH2 (Gmail) sessions and other callers.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiosmtplib

from serversync.connectors.net import ConnectOptions, tls_context, translate
from serversync.connectors.protocols import ProbeResult
from serversync.core.errors import (
    AuthError,
    ItemError,
    PermanentError,
    SyncError,
    TransientError,
)
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


# Logs a connected client in (e.g. XOAUTH2 for Gmail, `connectors.gmail.smtp_authenticator`).
Authenticator = Callable[[aiosmtplib.SMTP], Awaitable[None]]


async def connect(endpoint: Endpoint, login: Login, options: ConnectOptions, *,
                  local_hostname: str | None = None,
                  context: ssl.SSLContext | None = None,
                  authenticator: Authenticator | None = None) -> aiosmtplib.SMTP:
    """A connected, authenticated SMTP client; the caller closes it with `close`.

    ``local_hostname`` is the EHLO name; by default aiosmtplib asks ``socket.getfqdn()``
    (a resolver call per connection), so the send pipeline passes it once. ``context`` is a
    verifying TLS context from `connectors.net.tls_context` to share between sessions
    (loading the system trust store costs ~20 ms of CPU each time).
    """
    if endpoint.tls is not TlsMode.NONE and context is None:
        context = tls_context(options.ca_file)
    client = aiosmtplib.SMTP(
        hostname=endpoint.host, port=endpoint.port, timeout=options.timeout,
        use_tls=endpoint.tls is TlsMode.IMPLICIT,
        start_tls=endpoint.tls is TlsMode.STARTTLS, local_hostname=local_hostname,
        tls_context=context if endpoint.tls is not TlsMode.NONE else None)
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
        if authenticator is not None:
            await authenticator(client)
        else:
            await authenticate(client, endpoint, login)
    except BaseException:
        await close(client)
        raise
    return client


async def close(client: aiosmtplib.SMTP) -> None:
    """QUIT politely; drop the connection if the server does not answer."""
    if client.is_connected:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


@asynccontextmanager
async def session(endpoint: Endpoint, login: Login, options: ConnectOptions, *,
                  local_hostname: str | None = None) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected, authenticated SMTP session; QUIT on exit."""
    client = await connect(endpoint, login, options, local_hostname=local_hostname)
    try:
        yield client
    finally:
        await close(client)


async def authenticate(client: aiosmtplib.SMTP, endpoint: Endpoint, login: Login) -> None:
    if login.mode is AccessMode.APP:
        # an app login's secret is an OAuth client secret or a service account's private
        # key: never send it as a password (Gmail uses XOAUTH2, see connectors.gmail)
        raise PermanentError(f"SMTP at {endpoint.host}: app (OAuth) credentials cannot log in "
                             "with a password", fix="send through the profile kind's own "
                             "connector (XOAUTH2 for Gmail)", code="auth-unsupported")
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
        raise auth_error(exc.code, exc.message, f"{endpoint.host}:{endpoint.port}",
                         login) from None
    except aiosmtplib.SMTPException as exc:
        raise PermanentError(f"SMTP at {endpoint.host}: cannot authenticate ({exc})",
                             fix="the server offers no usable AUTH mechanism; enable AUTH "
                                 "PLAIN or LOGIN over TLS", code="auth-unavailable") from None


def auth_error(code: int, message: str, where: str, login: Login) -> SyncError:
    """What a refused AUTH means: busy (4xx), or credentials / impersonation to fix."""
    if 400 <= code < 500:
        return TransientError(f"SMTP login at {where} deferred ({code} {message})",
                              code="server-busy")
    if login.mode is AccessMode.IMPERSONATION:
        return AuthError(
            f"SMTP at {where}: service account could not authenticate as {login.target} "
            f"({code} {message})",
            fix="check the service account's password and that the server lets it act "
                "for users (SASL authorization / master user)",
            code="impersonation-refused")
    return AuthError(f"SMTP at {where}: login of {login.user} was rejected "
                     f"({code} {message})",
                     fix="update the credentials used for outgoing mail",
                     code="auth-failed")


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


# ---------------------------------------------------------------- sending


class MessageRefused(ItemError):
    """The server refused this message for good (5xx): the email fails with its reason."""

    code = "smtp-refused"

    def __init__(self, message: str, *, reply_code: int,
                 refused: dict[str, tuple[int, str]] | None = None) -> None:
        super().__init__(message, fix="read the server's reason; correct the recipients or "
                                      "the content and send a new email")
        self.reply_code = reply_code
        self.refused = refused or {}


class MessageDeferred(TransientError):
    """The server asked to try this message later (4xx)."""

    def __init__(self, message: str, *, reply_code: int,
                 refused: dict[str, tuple[int, str]] | None = None) -> None:
        super().__init__(message, code="smtp-deferred")
        self.reply_code = reply_code
        self.refused = refused or {}


class OutcomeUnknown(ItemError):
    """The connection broke while the message data was on its way: it may have arrived."""

    code = "outcome-unknown"


@dataclass(frozen=True, slots=True)
class Submission:
    """What the server said in one accepted mail transaction."""

    accepted: dict[str, tuple[int, str]]  # recipient -> RCPT reply
    refused: dict[str, tuple[int, str]]  # recipient -> RCPT reply (4xx or 5xx)
    reply: str  # the final reply to DATA, e.g. "2.0.0 Ok: queued as 4Xb2..."


def offers_smtputf8(client: aiosmtplib.SMTP) -> bool:
    return client.supports_extension("smtputf8")


def offers_8bitmime(client: aiosmtplib.SMTP) -> bool:
    return client.supports_extension("8bitmime")


_BROKEN = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError)


async def _reset(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


def lost(what: str, exc: BaseException) -> TransientError:
    return TransientError(f"SMTP connection lost during {what} ({type(exc).__name__}: {exc})",
                          fix="retried automatically; check the server if it persists",
                          code="connection-lost")


async def submit(client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
                 message: bytes, *, smtputf8: bool = False, eightbit: bool = False,
                 before_data: Callable[[], Awaitable[None]] | None = None) -> Submission:
    """One mail transaction: MAIL FROM, RCPT TO each recipient, DATA.

    ``before_data`` runs after the recipients were accepted and before DATA: the send
    pipeline journals "submitting" there, the last moment at which nothing was sent.
    """
    encoding = "utf-8" if smtputf8 else "ascii"
    options: list[str] = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(message)}")
    if smtputf8:
        options.append("SMTPUTF8")
    if (smtputf8 or eightbit) and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    try:
        await client.mail(sender, options=options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        await _reset(client)
        error = classify_reply(exc.code, exc.message, sender=sender, what="MAIL FROM")
        if error.code == "sender-not-owned":
            raise error from None
        text = f"{exc.code} {exc.message}"
        if 400 <= exc.code < 500:
            raise MessageDeferred(f"the server deferred sender {sender} ({text})",
                                  reply_code=exc.code) from None
        raise MessageRefused(f"the server refused sender {sender} ({text})",
                             reply_code=exc.code) from None
    except _BROKEN as exc:
        raise lost("MAIL FROM", exc) from None

    accepted: dict[str, tuple[int, str]] = {}
    refused: dict[str, tuple[int, str]] = {}
    for recipient in recipients:
        try:
            reply = await client.rcpt(recipient, encoding=encoding)
            accepted[recipient] = (reply.code, reply.message)
        except aiosmtplib.SMTPRecipientRefused as exc:
            error = classify_reply(exc.code, exc.message, sender=sender, what="RCPT TO")
            if error.code == "sender-not-owned":
                await _reset(client)
                raise error from None
            refused[recipient] = (exc.code, exc.message)
        except _BROKEN as exc:
            raise lost("RCPT TO", exc) from None
    if not accepted:
        await _reset(client)
        reasons = "; ".join(f"{r}: {c} {m}" for r, (c, m) in refused.items())
        if any(400 <= c < 500 for c, _ in refused.values()):
            raise MessageDeferred(f"the server deferred every recipient ({reasons})",
                                  reply_code=min(c for c, _ in refused.values()),
                                  refused=refused)
        raise MessageRefused(f"the server refused every recipient ({reasons})",
                             reply_code=min(c for c, _ in refused.values()), refused=refused)
    if before_data is not None:
        try:
            await before_data()
        except BaseException:
            await _reset(client)
            raise
    try:
        response = await client.data(message)
    except aiosmtplib.SMTPDataError as exc:
        # A reply code is a definite answer: the message was not taken.
        await _reset(client)
        text = f"{exc.code} {exc.message}"
        if 400 <= exc.code < 500:
            raise MessageDeferred(f"the server deferred the message ({text})",
                                  reply_code=exc.code, refused=refused) from None
        raise MessageRefused(f"the server refused the message ({text})", reply_code=exc.code,
                             refused=refused) from None
    except _BROKEN as exc:
        raise OutcomeUnknown(
            f"the SMTP connection broke during DATA ({type(exc).__name__}: {exc}); the "
            "server may or may not have accepted the message",
            fix="ask the recipients whether it arrived; send a new email if it did not") from None
    return Submission(accepted, refused, response.message)
