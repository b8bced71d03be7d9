"""POP3 mailboxes (RFC 1939, STLS from RFC 2595, SASL PLAIN from RFC 5034).

A small asyncio client for the same reason as `connectors.imapwire`: poplib blocks, and
impersonation needs ``AUTH PLAIN`` with an authorization identity. POP3 has one folder, so
delegation (shared folders) does not exist here: a delegation profile cannot use POP3.
"""

from __future__ import annotations

import asyncio
import base64

from serversync.connectors.net import ConnectOptions, open_stream, start_tls, translated
from serversync.connectors.protocols import ProbeResult
from serversync.core.errors import AuthError, PermanentError, SyncError, TransientError
from serversync.core.model import AccessMode, Channel, Endpoint, Mailbox, Profile, TlsMode
from serversync.core.rules import Login


class Pop3Error(SyncError):
    code = "pop3-refused"


class Pop3Client:
    """One POP3 session. Constructing it does no I/O; `connect()` does."""

    def __init__(self, endpoint: Endpoint, options: ConnectOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.capabilities: set[str] = set()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _line(self) -> bytes:
        assert self._reader is not None
        with translated(self.endpoint, "POP3"):
            line = await asyncio.wait_for(self._reader.readuntil(b"\r\n"), self.options.timeout)
        return line[:-2]

    async def command(self, line: str | bytes, *, secret: bool = False) -> bytes:
        """Send one command; return the text after ``+OK`` or raise `Pop3Error`."""
        assert self._writer is not None
        data = line.encode() if isinstance(line, str) else line
        with translated(self.endpoint, "POP3"):
            self._writer.write(data + b"\r\n")
            await self._writer.drain()
        reply = await self._line()
        if reply.startswith(b"+OK"):
            return reply[3:].strip()
        shown = data.split(b" ", 1)[0].decode() if secret else data.decode(errors="replace")
        raise Pop3Error(f"POP3 {shown} refused: {reply.decode(errors='replace')}")

    async def multiline(self, line: str) -> list[bytes]:
        """A command whose answer is a dot-terminated list (CAPA, UIDL, LIST, RETR)."""
        await self.command(line)
        lines: list[bytes] = []
        while True:
            item = await self._line()
            if item == b".":
                return lines
            lines.append(item[1:] if item.startswith(b"..") else item)

    async def connect(self) -> None:
        self._reader, self._writer = await open_stream(self.endpoint, self.options, "POP3")
        greeting = await self._line()
        if not greeting.startswith(b"+OK"):
            raise PermanentError(f"{self.endpoint.host}:{self.endpoint.port} is not a POP3 "
                                 "server", fix="check the port", code="not-pop3")
        await self._capa()
        if self.endpoint.tls is TlsMode.STARTTLS:
            if "STLS" not in self.capabilities:
                raise PermanentError(f"POP3 server at {self.endpoint.host} does not offer STLS",
                                     fix="use implicit TLS (usually port 995)",
                                     code="tls-unavailable")
            await self.command("STLS")
            await start_tls(self._writer, self.endpoint, self.options, "POP3")
            await self._capa()

    async def _capa(self) -> None:
        try:
            self.capabilities = {c.split(b" ", 1)[0].decode().upper() if not c.upper().startswith(
                b"SASL") else c.decode().upper() for c in await self.multiline("CAPA")}
        except Pop3Error:
            self.capabilities = set()

    async def login(self, login: Login) -> None:
        if login.mode is AccessMode.DELEGATION:
            raise PermanentError(
                "POP3 has no shared folders, so a delegate cannot read another user's mail",
                fix="use impersonation or per-mailbox credentials for POP3 profiles",
                code="delegation-unsupported")
        secret = login.secret.reveal() if login.secret else ""
        try:
            if login.authzid is not None:
                token = base64.b64encode(f"{login.authzid}\0{login.user}\0{secret}".encode())
                await self.command(b"AUTH PLAIN " + token, secret=True)
            else:
                await self.command(f"USER {login.user}")
                await self.command(f"PASS {secret}", secret=True)
        except Pop3Error as exc:
            text = exc.message.split(": ", 1)[-1]
            if "[IN-USE]" in text or "[SYS/TEMP]" in text:
                raise TransientError(f"POP3 login deferred: {text}", code="server-busy") from None
            if login.mode is AccessMode.IMPERSONATION:
                raise AuthError(
                    f"POP3 at {self.endpoint.host}: service account could not log in as "
                    f"{login.target} ({text})",
                    fix="check the service account's password and its impersonation rights "
                        "(Dovecot master user)", code="impersonation-refused") from None
            raise AuthError(f"POP3 at {self.endpoint.host}: login of {login.user} was rejected "
                            f"({text})", fix="update the mailbox's username and secret",
                            code="auth-failed") from None

    async def stat(self) -> tuple[int, int]:
        count, size = (await self.command("STAT")).split()[:2]
        return int(count), int(size)

    async def quit(self) -> None:
        if self._writer is None:
            return
        try:
            await self.command("QUIT")
        except (SyncError, OSError):
            pass
        await self.close()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (TimeoutError, OSError):
                pass


async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    assert profile.incoming is not None
    client = Pop3Client(profile.incoming, options)
    try:
        await client.connect()
        await client.login(login)
        count, size = await client.stat()
    finally:
        await client.quit()
    return ProbeResult(f"POP3 ({profile.incoming.tls.value}) {profile.incoming.host}:"
                       f"{profile.incoming.port} as {login.mode.value}: {count} messages, "
                       f"{size} bytes")
