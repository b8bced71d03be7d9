"""POP3 mailboxes (RFC 1939, STLS from RFC 2595, SASL PLAIN from RFC 5034).

A small asyncio client for the same reason as `connectors.imapwire`: poplib blocks, and
impersonation needs ``AUTH PLAIN`` with an authorization identity. POP3 has one folder, so
delegation (shared folders) does not exist here: a delegation profile cannot use POP3.

`Pop3Source` is the incoming `MailSource`: UIDL-based (the item links of processed UIDLs
are the cursor), RETR in batches, optional DELE of processed mail for queue mailboxes —
deletions happen at QUIT, after the batch is committed, and a crash before QUIT leaves the
mail on the server, where the next run recognises it by UIDL and deletes it then.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncGenerator, Sequence

from serversync.connectors.net import ConnectOptions, open_stream, start_tls, translated
from serversync.connectors.protocols import (
    Disposition,
    FetchBatch,
    FolderCursor,
    KnownFilter,
    ProbeResult,
    RemoteMessage,
)
from serversync.core.errors import AuthError, PermanentError, SyncError, TransientError
from serversync.core.model import (
    AccessMode,
    AfterProcessing,
    Channel,
    Endpoint,
    Mailbox,
    Profile,
    TlsMode,
)
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
        # One command and its whole answer at a time: the incoming job fetches the next
        # batch (RETR) while it deletes the committed one (DELE), on this one session.
        self._lock = asyncio.Lock()

    async def _line(self) -> bytes:
        assert self._reader is not None
        with translated(self.endpoint, "POP3"):
            line = await asyncio.wait_for(self._reader.readuntil(b"\r\n"), self.options.timeout)
        return line[:-2]

    async def command(self, line: str | bytes, *, secret: bool = False) -> bytes:
        """Send one command; return the text after ``+OK`` or raise `Pop3Error`."""
        async with self._lock:
            return await self._command(line, secret=secret)

    async def _command(self, line: str | bytes, *, secret: bool = False) -> bytes:
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
        async with self._lock:
            await self._command(line)
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

    async def uidl(self) -> list[tuple[int, str]]:
        """(message number, unique id) of every message in the maildrop (RFC 1939 §7)."""
        try:
            lines = await self.multiline("UIDL")
        except Pop3Error as exc:
            raise PermanentError(f"POP3 server at {self.endpoint.host} has no UIDL, so "
                                 f"new mail cannot be told from old ({exc.message})",
                                 fix="enable UIDL on the server, or use IMAP", code="no-uidl"
                                 ) from None
        found = []
        for line in lines:
            number, _, uid = line.decode(errors="replace").partition(" ")
            if number.isdigit() and uid.strip():
                found.append((int(number), uid.strip()))
        return found

    async def retr(self, number: int) -> bytes:
        """One whole message, dot-unstuffed, with CRLF line ends."""
        lines = await self.multiline(f"RETR {number}")
        return b"\r\n".join(lines) + b"\r\n" if lines else b""

    async def dele(self, number: int) -> None:
        """Mark a message deleted; the server removes it at QUIT (the UPDATE state)."""
        await self.command(f"DELE {number}")

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


class Pop3Source:
    """A POP3 maildrop as a `MailSource` with the single folder INBOX."""

    def __init__(self, profile: Profile, mailbox: Mailbox, login: Login,
                 options: ConnectOptions, *, delete_processed: bool = False) -> None:
        assert profile.incoming is not None
        self.mailbox = mailbox
        self.login = login
        self.delete_processed = delete_processed
        self.client = Pop3Client(profile.incoming, options)
        self._numbers: dict[str, int] = {}

    async def open(self) -> None:
        await self.client.connect()
        await self.client.login(self.login)

    async def close(self) -> None:
        await self.client.quit()  # QUIT commits the DELEs of this session

    async def resolve_folder(self, folder: str) -> str:
        if folder.upper() != "INBOX":
            raise PermanentError(f"POP3 has only the INBOX, not {folder!r}",
                                 fix="set the mailbox's folders to [INBOX]", code="folder-missing")
        return "INBOX"

    async def fetch(self, folder: str, cursor: FolderCursor | None, *, batch_size: int,
                    known: KnownFilter) -> AsyncGenerator[FetchBatch, None]:
        listing = await self.client.uidl()
        self._numbers = {uid: number for number, uid in listing}
        done = await known([uid for _, uid in listing])
        if self.delete_processed:
            # processed in an earlier run that ended before QUIT: delete them now
            for uid in sorted(done):
                await self.client.dele(self._numbers[uid])
        new = [(n, uid) for n, uid in listing if uid not in done]
        for i in range(0, len(new), batch_size):
            messages = [RemoteMessage("INBOX", uid, await self.client.retr(n))
                        for n, uid in new[i:i + batch_size]]
            yield FetchBatch("INBOX", messages, FolderCursor())

    async def finish(self, folder: str, dispositions: Sequence[Disposition]) -> None:
        for d in dispositions:
            if d.action == "delete" and d.remote_id in self._numbers:
                await self.client.dele(self._numbers.pop(d.remote_id))


def source(profile: Profile, mailbox: Mailbox, login: Login,
           options: ConnectOptions) -> Pop3Source:
    """The incoming source of a mailbox: deletes processed mail only for delete-after."""
    return Pop3Source(profile, mailbox, login, options,
                      delete_processed=mailbox.after_processing is AfterProcessing.DELETE)
