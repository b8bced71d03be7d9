"""The send pipeline's SMTP submission client: RFC 2920 pipelining on one asyncio protocol.

Follows RFC 5321 (SMTP), RFC 6409 (submission), RFC 3207 (STARTTLS), RFC 4954 with RFC 4616
(AUTH PLAIN, with an authzid for impersonation) and RFC 2920 (PIPELINING). It is used only
for the send pipeline's hot path (`serversync.services.outgoing`); the probe, Test & Enable
and XOAUTH2 (Gmail) sessions keep aiosmtplib (`connectors.smtp`).

Why a second client: aiosmtplib waits for each reply before the next command and its
protocol object holds a single pending reply, so MAIL FROM, RCPT TO and DATA cost three
round trips and several tasks and timers per message. Here one write carries the whole
envelope (MAIL, every RCPT, DATA) and the replies are matched in order to a queue of
waiters; the message content follows the ``354``. Per message that is two round trips and
a fraction of the CPU (docs/benchmarks.md).

**Never twice.** ``before_data`` (the send pipeline's durable "submitting" mark) starts as
the envelope is written and must have finished before the first byte of the message
content is sent: until the content's final ``.`` the server cannot have accepted the
message. If the mark fails while the server is waiting for content (after ``354``), the
connection is dropped — a server discards a transaction whose data never ended — rather
than sending anything. A server without PIPELINING is driven one command at a time, with
the mark after the recipients were accepted.

Errors are those of `connectors.smtp.submit` (`MessageDeferred`, `MessageRefused`,
``sender-not-owned``, `TransientError` before the content was sent, `OutcomeUnknown` once it
was), so the pipeline treats both clients alike.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence

from serversync.connectors import smtp
from serversync.connectors.net import ConnectOptions, tls_context, translate
from serversync.core.errors import PermanentError, SyncError
from serversync.core.model import Endpoint, TlsMode
from serversync.core.rules import Login

Reply = tuple[int, str]
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT = re.compile(rb"^\.", re.MULTILINE)


class _Lost(Exception):
    """The connection closed, or a reply could not be parsed."""


def data_payload(message: bytes) -> bytes:
    """The message as DATA content (RFC 5321 §4.5.2): CRLF lines, dots doubled, ``.`` end."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:  # not CRLF throughout
        message = _LINE_END.sub(b"\r\n", message)
    if message.startswith(b".") or b"\n." in message:
        message = _DOT.sub(b"..", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"


class _Protocol(asyncio.Protocol):
    """Splits the byte stream into replies and hands them to waiters in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
                self._fail(_Lost(f"malformed SMTP reply line {line[:80]!r}"))
                return
            self._lines.append(line[4:].decode("utf-8", errors="replace"))
            if line[3:4] != b"-":
                reply = (int(line[:3]), "\n".join(self._lines))
                self._lines = []
                if self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(reply)
                else:
                    self._replies.append(reply)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or _Lost("the server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_Lost(str(exc)) if not isinstance(exc, _Lost) else exc)
        if self.transport is not None:
            self.transport.abort()

    def expect(self) -> asyncio.Future[Reply]:
        """A future for the next reply not yet claimed (replies come in command order)."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if self._replies:
            future.set_result(self._replies.popleft())
        elif self.lost is not None:
            future.set_exception(_Lost(str(self.lost)))
        else:
            self._waiters.append(future)
        return future


class SubmissionClient:
    """One authenticated submission session; `connect` opens it. Not safe for two tasks."""

    def __init__(self, endpoint: Endpoint, options: ConnectOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.extensions: dict[str, str] = {}
        self._protocol: _Protocol | None = None
        self._content_sent = False

    # ------------------------------------------------------------ session

    @property
    def is_connected(self) -> bool:
        protocol = self._protocol
        return protocol is not None and protocol.lost is None and protocol.transport is not None \
            and not protocol.transport.is_closing()

    def supports_extension(self, name: str) -> bool:
        return name.lower() in self.extensions

    async def connect(self, login: Login, *, local_hostname: str,
                      context: ssl.SSLContext | None = None) -> None:
        """Connect, greet, STARTTLS or implicit TLS as the endpoint says, EHLO, AUTH."""
        endpoint = self.endpoint
        if endpoint.tls is not TlsMode.NONE and context is None:
            context = tls_context(self.options.ca_file)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.options.timeout):
                _, protocol = await loop.create_connection(
                    _Protocol, endpoint.host, endpoint.port,
                    ssl=context if endpoint.tls is TlsMode.IMPLICIT else None,
                    server_hostname=endpoint.host if endpoint.tls is TlsMode.IMPLICIT else None)
                self._protocol = protocol
                await self._expect(220, "greeting")
                await self._ehlo(local_hostname)
                if endpoint.tls is TlsMode.STARTTLS:
                    if not self.supports_extension("starttls"):
                        raise PermanentError(
                            f"SMTP at {endpoint.host}:{endpoint.port} does not offer STARTTLS",
                            fix="enable STARTTLS on the server, or use implicit TLS",
                            code="tls-unavailable")
                    await self._command(b"STARTTLS", 220, "STARTTLS")
                    assert protocol.transport is not None and context is not None
                    transport = await loop.start_tls(protocol.transport, protocol, context,
                                                     server_hostname=endpoint.host)
                    assert isinstance(transport, asyncio.Transport)
                    protocol.transport = transport
                    await self._ehlo(local_hostname)
                await self._authenticate(login)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, SyncError):
                raise
            if isinstance(exc, (OSError, TimeoutError, _Lost)):
                raise translate(exc if isinstance(exc, OSError) else ConnectionError(str(exc)),
                                endpoint, "SMTP") from exc
            raise

    async def _ehlo(self, name: str) -> None:
        code, text = await self._roundtrip(b"EHLO " + name.encode("ascii", "replace"))
        if code != 250:
            raise smtp.classify_reply(code, text, sender="", what="EHLO")
        self.extensions = {}
        for line in text.split("\n")[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.lower()] = params

    async def _authenticate(self, login: Login) -> None:
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        secret = login.secret.reveal() if login.secret else ""
        mechanisms = self.extensions.get("auth", "").upper().split()
        if "PLAIN" in mechanisms or login.authzid is not None:
            token = base64.b64encode(
                f"{login.authzid or ''}\0{login.user}\0{secret}".encode()).decode("ascii")
            code, text = await self._roundtrip(f"AUTH PLAIN {token}".encode("ascii"))
        elif "LOGIN" in mechanisms:
            code, text = await self._roundtrip(b"AUTH LOGIN")
            for value in (login.user, secret):
                if code != 334:
                    break
                code, text = await self._roundtrip(base64.b64encode(value.encode()))
        else:
            raise PermanentError(f"SMTP at {self.endpoint.host}: cannot authenticate (the "
                                 f"server offers AUTH {' '.join(mechanisms) or 'nothing'})",
                                 fix="the server offers no usable AUTH mechanism; enable AUTH "
                                     "PLAIN or LOGIN over TLS", code="auth-unavailable")
        if code != 235:
            raise smtp.auth_error(code, text, where, login)

    async def close(self) -> None:
        """QUIT politely (briefly); drop the connection if the server does not answer."""
        if self.is_connected:
            try:
                async with asyncio.timeout(min(5.0, self.options.timeout)):
                    await self._roundtrip(b"QUIT")
            except (OSError, TimeoutError, _Lost):
                pass
        self.abort()

    def abort(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    # ------------------------------------------------------------ wire

    def _write(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.lost is not None:
            raise _Lost("the connection is closed")
        protocol.transport.write(data)

    async def _roundtrip(self, line: bytes) -> Reply:
        assert self._protocol is not None
        self._write(line + b"\r\n")
        return await self._protocol.expect()

    async def _expect(self, code: int, what: str) -> Reply:
        assert self._protocol is not None
        reply = await self._protocol.expect()
        if reply[0] != code:
            raise smtp.classify_reply(reply[0], reply[1], sender="", what=what)
        return reply

    async def _command(self, line: bytes, code: int, what: str) -> Reply:
        self._write(line + b"\r\n")
        return await self._expect(code, what)

    # ------------------------------------------------------------ sending

    async def submit(self, sender: str, recipients: Sequence[str], message: bytes, *,
                     smtputf8: bool = False, eightbit: bool = False,
                     before_data: Callable[[], Awaitable[None]] | None = None,
                     ) -> smtp.Submission:
        """One mail transaction; pipelined when the server offers PIPELINING.

        Same contract and errors as `connectors.smtp.submit`; ``before_data`` has finished
        before any message content is written.
        """
        assert self._protocol is not None and recipients
        encoding = "utf-8" if smtputf8 else "ascii"
        params = ""
        if self.supports_extension("size"):
            params += f" SIZE={len(message)}"
        if smtputf8:
            params += " SMTPUTF8"
        if (smtputf8 or eightbit) and self.supports_extension("8bitmime"):
            params += " BODY=8BITMIME"
        commands = [f"MAIL FROM:<{sender}>{params}\r\n".encode(encoding),
                    *(f"RCPT TO:<{r}>\r\n".encode(encoding) for r in recipients), b"DATA\r\n"]
        payload = data_payload(message)
        self._content_sent = False
        try:
            async with asyncio.timeout(self.options.timeout):
                if self.supports_extension("pipelining"):
                    return await self._pipelined(sender, recipients, commands, payload,
                                                 before_data)
                return await self._lockstep(sender, recipients, commands, payload, before_data)
        except (_Lost, OSError, TimeoutError) as exc:
            self.abort()
            if self._content_sent:
                raise smtp.OutcomeUnknown(
                    f"the SMTP connection broke during DATA ({type(exc).__name__}: {exc}); "
                    "the server may or may not have accepted the message",
                    fix="ask the recipients whether it arrived; send a new email if it did "
                        "not") from None
            raise smtp.lost("the mail transaction", exc) from None

    async def _pipelined(self, sender: str, recipients: Sequence[str], commands: list[bytes],
                         payload: bytes, before_data: Callable[[], Awaitable[None]] | None,
                         ) -> smtp.Submission:
        protocol = self._protocol
        assert protocol is not None
        self._write(b"".join(commands))
        futures = [protocol.expect() for _ in commands]
        mark: asyncio.Task[None] | None = None
        if before_data is not None:
            mark = asyncio.ensure_future(before_data())
        try:
            replies = [await f for f in futures]
        except BaseException:
            if mark is not None:
                await asyncio.gather(mark, return_exceptions=True)
            raise
        mail, rcpts, data = replies[0], replies[1:-1], replies[-1]
        accepted, refused = self._recipients(sender, recipients, mail, rcpts)
        if data[0] == 354:
            if mail[0] != 250 or not accepted:
                # a server that says 354 without recipients: end the empty transaction
                self._write(b".\r\n")
                await protocol.expect()
        if mark is not None:
            try:
                await mark
            except BaseException:
                if data[0] == 354:
                    self.abort()  # content never sent: the server discards the transaction
                else:
                    await self._rset()
                raise
        return await self._conclude(sender, mail, accepted, refused, data, payload)

    async def _lockstep(self, sender: str, recipients: Sequence[str], commands: list[bytes],
                        payload: bytes, before_data: Callable[[], Awaitable[None]] | None,
                        ) -> smtp.Submission:
        assert self._protocol is not None
        self._write(commands[0])
        mail = await self._protocol.expect()
        rcpts: list[Reply] = []
        if mail[0] == 250:
            for command in commands[1:-1]:
                self._write(command)
                rcpts.append(await self._protocol.expect())
        accepted, refused = self._recipients(sender, recipients, mail, rcpts)
        data: Reply = (503, "DATA not sent")
        if accepted:
            if before_data is not None:
                try:
                    await before_data()
                except BaseException:
                    await self._rset()
                    raise
            self._write(commands[-1])
            data = await self._protocol.expect()
        return await self._conclude(sender, mail, accepted, refused, data, payload)

    def _recipients(self, sender: str, recipients: Sequence[str], mail: Reply,
                    rcpts: Sequence[Reply]) -> tuple[dict[str, Reply], dict[str, Reply]]:
        accepted: dict[str, Reply] = {}
        refused: dict[str, Reply] = {}
        if mail[0] != 250:
            return accepted, refused
        for recipient, reply in zip(recipients, rcpts, strict=True):
            if 200 <= reply[0] < 300:
                accepted[recipient] = reply
            else:
                refused[recipient] = reply
        return accepted, refused

    async def _conclude(self, sender: str, mail: Reply, accepted: dict[str, Reply],
                        refused: dict[str, Reply], data: Reply,
                        payload: bytes) -> smtp.Submission:
        """Everything but the content was answered: classify, or send the content."""
        if mail[0] != 250:
            await self._rset()
            error = smtp.classify_reply(mail[0], mail[1], sender=sender, what="MAIL FROM")
            if error.code == "sender-not-owned":
                raise error
            text = f"{mail[0]} {mail[1]}"
            if 400 <= mail[0] < 500:
                raise smtp.MessageDeferred(f"the server deferred sender {sender} ({text})",
                                           reply_code=mail[0])
            raise smtp.MessageRefused(f"the server refused sender {sender} ({text})",
                                      reply_code=mail[0])
        for code, text in refused.values():
            error = smtp.classify_reply(code, text, sender=sender, what="RCPT TO")
            if error.code == "sender-not-owned":
                await self._rset()
                raise error
        if not accepted:
            await self._rset()
            reasons = "; ".join(f"{r}: {c} {m}" for r, (c, m) in refused.items())
            if any(400 <= c < 500 for c, _ in refused.values()):
                raise smtp.MessageDeferred(
                    f"the server deferred every recipient ({reasons})",
                    reply_code=min(c for c, _ in refused.values()), refused=refused)
            raise smtp.MessageRefused(f"the server refused every recipient ({reasons})",
                                      reply_code=min(c for c, _ in refused.values()),
                                      refused=refused)
        if data[0] != 354:
            await self._rset()
            text = f"{data[0]} {data[1]}"
            if 400 <= data[0] < 500:
                raise smtp.MessageDeferred(f"the server deferred the message ({text})",
                                           reply_code=data[0], refused=refused)
            raise smtp.MessageRefused(f"the server refused the message ({text})",
                                      reply_code=data[0], refused=refused)
        assert self._protocol is not None
        self._content_sent = True  # from here on a failure leaves the outcome unknown
        self._write(payload)
        code, text = await self._protocol.expect()
        if code != 250:
            text = f"{code} {text}"
            if 400 <= code < 500:
                raise smtp.MessageDeferred(f"the server deferred the message ({text})",
                                           reply_code=code, refused=refused)
            raise smtp.MessageRefused(f"the server refused the message ({text})",
                                      reply_code=code, refused=refused)
        return smtp.Submission(accepted, refused, text)

    async def _rset(self) -> None:
        if not self.is_connected:
            return
        try:
            code, _ = await self._roundtrip(b"RSET")
        except (_Lost, OSError):
            code = 0
        if code != 250:
            self.abort()


async def connect(endpoint: Endpoint, login: Login, options: ConnectOptions, *,
                  local_hostname: str, context: ssl.SSLContext | None = None,
                  ) -> SubmissionClient:
    """An authenticated `SubmissionClient`; the caller closes it."""
    client = SubmissionClient(endpoint, options)
    await client.connect(login, local_hostname=local_hostname, context=context)
    return client

