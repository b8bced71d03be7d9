"""A small asyncio IMAP4rev1 client: the wire, not the sync logic (RFC 3501 / 9051).

Why not aioimaplib: it has neither STARTTLS nor ``AUTHENTICATE PLAIN`` with an
authorization identity, and both are how a service account reaches a user's mailbox here
(RFC 4616 authzid, Dovecot master users). This module does only framing: tags, quoting,
literals (``{n}`` and LITERAL+), continuation requests and the tagged result. Responses come
back in the shape imaplib produces (bytes lines, ``(prefix, literal)`` tuples), so that
imapclient's well-tested response parser can read FETCH data (see `connectors.imap`).

Failures become typed errors: the login classifies ``[AUTHENTICATIONFAILED]`` and
``[AUTHORIZATIONFAILED]``; anything the server refuses raises `ImapNo` with its text.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from serversync.connectors.net import ConnectOptions, open_stream, start_tls, translated
from serversync.core.errors import AuthError, PermanentError, SyncError, TransientError
from serversync.core.model import AccessMode, Endpoint, TlsMode
from serversync.core.rules import Login

Item = bytes | tuple[bytes, bytes]
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
_ATOM_SPECIALS = re.compile(rb'[(){ %*"\\\]\x00-\x1f\x7f-\xff]')
_CODE = re.compile(rb"^\[([A-Z-]+)")
_STATUS_ITEMS = re.compile(rb"\(([^()]*)\)\s*$")
_IDLE_EVENT = re.compile(rb"^\* \d+ (EXISTS|EXPUNGE|FETCH|RECENT)|^\* (VANISHED|BYE)", re.IGNORECASE)


class ImapNo(SyncError):
    """The server answered NO or BAD to a command."""

    code = "imap-refused"

    def __init__(self, command: str, status: str, text: str) -> None:
        super().__init__(f"IMAP {command} refused: {status} {text}")
        self.status, self.text = status, text
        match = _CODE.match(text.encode())
        self.response_code = match.group(1).decode() if match else ""


@dataclass
class Response:
    """Everything the server said for one command."""

    status: str
    text: str
    untagged: list[list[Item]] = field(default_factory=list)

    def lines(self, keyword: bytes) -> list[list[Item]]:
        """Untagged responses whose first word (after ``*``) or second word is ``keyword``."""
        found = []
        for response in self.untagged:
            head = response[0] if isinstance(response[0], bytes) else response[0][0]
            words = head.split(b" ", 2)
            if keyword.upper() in (w.upper() for w in words[:2]):
                found.append(response)
        return found


def quote(value: str | bytes) -> bytes:
    """An IMAP astring: an atom when safe, otherwise a quoted string.

    Values with CR, LF or 8-bit bytes cannot be quoted; `ImapClient.command` sends those as
    literals (pass them wrapped in `Literal`).
    """
    data = value.encode() if isinstance(value, str) else value
    if data and not _ATOM_SPECIALS.search(data):
        return data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@dataclass(frozen=True, slots=True)
class Literal:
    data: bytes


def needs_literal(value: str) -> bool:
    return any(ord(c) > 126 or c in "\r\n\x00" for c in value)


class ImapClient:
    """One IMAP connection. Constructing it does no I/O; `connect()` does."""

    def __init__(self, endpoint: Endpoint, options: ConnectOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.capabilities: set[str] = set()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tag = 0

    # ------------------------------------------------------------ framing

    async def _read_line(self) -> bytes:
        assert self._reader is not None
        # asyncio.timeout, not wait_for: wait_for wraps every read in a new task, which was
        # a tenth of the incoming sync's event-loop CPU (three reads per fetched message)
        async with asyncio.timeout(self.options.timeout):
            line = await self._reader.readuntil(b"\r\n")
        return line[:-2]

    async def _read_response(self) -> list[Item]:
        """One logical response line, with its literals read in."""
        assert self._reader is not None
        items: list[Item] = []
        line = await self._read_line()
        while True:
            match = _LITERAL.search(line)
            if match is None:
                items.append(line)
                return items
            size = int(match.group(1))
            async with asyncio.timeout(self.options.timeout):
                data = await self._reader.readexactly(size)
            items.append((line, data))
            line = await self._read_line()

    async def _send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    def _next_tag(self) -> bytes:
        self._tag += 1
        return b"A%04d" % self._tag

    async def command(self, name: str, *args: bytes | Literal, check: bool = True) -> Response:
        """Send one command and collect every response until its tagged status."""
        if self._writer is None:
            raise PermanentError("IMAP client is not connected", code="imap-state")
        tag = self._next_tag()
        literal_plus = "LITERAL+" in self.capabilities
        with translated(self.endpoint, "IMAP"):
            # parts joined once: `bytes +=` recopied the whole MULTIAPPEND batch per message
            # (quadratic; a third of the send pipeline's CPU, docs/benchmarks.md)
            chunk: list[bytes] = [tag, b" ", name.encode()]
            for arg in args:
                if isinstance(arg, Literal):
                    chunk.append(b" {%d%s}\r\n" % (len(arg.data),
                                                    b"+" if literal_plus else b""))
                    if not literal_plus:
                        await self._send(b"".join(chunk))
                        await self._expect_continuation()
                        chunk = []
                    chunk.append(arg.data)
                else:
                    chunk += (b" ", arg)
            chunk.append(b"\r\n")
            await self._send(b"".join(chunk))
            return await self._collect(tag, name, check)

    async def _expect_continuation(self) -> None:
        while True:
            response = await self._read_response()
            head = response[0] if isinstance(response[0], bytes) else response[0][0]
            if head.startswith(b"+"):
                return
            if not head.startswith(b"*"):
                raise ImapNo("literal", "BAD", head.decode(errors="replace"))

    async def _collect(self, tag: bytes, name: str, check: bool) -> Response:
        untagged: list[list[Item]] = []
        while True:
            response = await self._read_response()
            head = response[0] if isinstance(response[0], bytes) else response[0][0]
            if head.startswith(tag + b" "):
                status, _, text = head[len(tag) + 1:].partition(b" ")
                result = Response(status.decode().upper(), text.decode(errors="replace"),
                                  untagged)
                if check and result.status != "OK":
                    raise ImapNo(name, result.status, result.text)
                self._capabilities_from(result.text)
                return result
            if head.startswith(b"* "):
                self._capabilities_from_untagged(head)
                if head.upper().startswith(b"* BYE"):
                    untagged.append(response)
                    continue
                untagged.append(response)

    def _capabilities_from_untagged(self, head: bytes) -> None:
        if head.upper().startswith(b"* CAPABILITY "):
            self.capabilities = set(head[13:].decode().upper().split())
        elif head.upper().startswith(b"* OK [CAPABILITY "):
            self._capabilities_from(head[5:].decode(errors="replace"))

    def _capabilities_from(self, text: str) -> None:
        if text.upper().startswith("[CAPABILITY "):
            self.capabilities = set(text[12:].split("]", 1)[0].upper().split())

    # ------------------------------------------------------------ session

    async def connect(self) -> None:
        """Open the connection, read the greeting, and upgrade with STARTTLS when asked to."""
        self._reader, self._writer = await open_stream(self.endpoint, self.options, "IMAP")
        with translated(self.endpoint, "IMAP"):
            greeting = await self._read_response()
        head = greeting[0] if isinstance(greeting[0], bytes) else greeting[0][0]
        if head.upper().startswith(b"* BYE"):
            raise TransientError(f"IMAP server at {self.endpoint.host} refused the session: "
                                 f"{head.decode(errors='replace')}", code="server-busy")
        if not head.upper().startswith((b"* OK", b"* PREAUTH")):
            raise PermanentError(f"{self.endpoint.host}:{self.endpoint.port} is not an IMAP "
                                 "server", fix="check the port", code="not-imap")
        self._capabilities_from_untagged(head)
        if not self.capabilities:
            await self.command("CAPABILITY")
        if self.endpoint.tls is TlsMode.STARTTLS:
            if "STARTTLS" not in self.capabilities:
                raise PermanentError(
                    f"IMAP server at {self.endpoint.host} does not offer STARTTLS",
                    fix="use implicit TLS (usually port 993) or enable STARTTLS on the server",
                    code="tls-unavailable")
            await self.command("STARTTLS")
            assert self._writer is not None
            await start_tls(self._writer, self.endpoint, self.options, "IMAP")
            await self.command("CAPABILITY")

    async def login(self, login: Login) -> None:
        """Authenticate as ``login`` says: own, impersonation (authzid / master user), delegate."""
        secret = login.secret.reveal() if login.secret else ""
        try:
            if login.authzid is not None:
                await self.authenticate_plain(login.authzid, login.user, secret)
            elif needs_literal(login.user) or needs_literal(secret):
                await self.command("LOGIN", Literal(login.user.encode()),
                                   Literal(secret.encode()))
            else:
                await self.command("LOGIN", quote(login.user), quote(secret))
        except ImapNo as exc:
            raise await self._login_failure(login, exc) from None
        if "IMAP4REV1" not in self.capabilities or len(self.capabilities) < 3:
            await self.command("CAPABILITY")

    async def authenticate_plain(self, authzid: str, authcid: str, password: str) -> None:
        token = base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())
        if "SASL-IR" in self.capabilities:
            await self.command("AUTHENTICATE", b"PLAIN", token)
            return
        tag = self._next_tag()
        with translated(self.endpoint, "IMAP"):
            await self._send(tag + b" AUTHENTICATE PLAIN\r\n")
            await self._expect_continuation()
            await self._send(token + b"\r\n")
            await self._collect(tag, "AUTHENTICATE", True)

    async def xoauth2(self, user: str, token: str) -> None:
        payload = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
        try:
            await self.command("AUTHENTICATE", b"XOAUTH2", payload)
        except ImapNo as exc:
            raise AuthError(f"IMAP XOAUTH2 login of {user} was refused: {exc.text}",
                            fix="check the OAuth grant and scopes for this mailbox") from None

    async def _login_failure(self, login: Login, exc: ImapNo) -> SyncError:
        """Tell a wrong password apart from a service account that may not impersonate."""
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        if exc.response_code in ("UNAVAILABLE", "INUSE", "LIMIT"):
            return TransientError(f"IMAP login at {where} deferred: {exc.text}",
                                  code="server-busy")
        if login.mode is AccessMode.IMPERSONATION:
            service = login.service or login.user
            if exc.response_code == "AUTHORIZATIONFAILED" or await self._service_login_ok(
                    service, login):
                return AuthError(
                    f"IMAP at {where}: service account {service} may not impersonate "
                    f"{login.target} ({exc.text})",
                    fix="grant the service account impersonation rights on the server (a "
                        "Dovecot master user, or SASL authorization for authzid), and check "
                        "that the user exists", code="impersonation-refused")
            return AuthError(
                f"IMAP at {where}: the password of service account {service} was rejected "
                f"({exc.text})", fix="update the profile's service_secret", code="auth-failed")
        who = login.user
        fix = ("update the profile's service_secret" if login.mode is AccessMode.DELEGATION
               else "update the mailbox's username and secret")
        return AuthError(f"IMAP at {where}: login of {who} was rejected ({exc.text})",
                         fix=fix, code="auth-failed")

    async def _service_login_ok(self, service: str, login: Login) -> bool:
        """Whether the service account's own login works (a second, separate connection)."""
        probe = ImapClient(self.endpoint, self.options)
        try:
            await probe.connect()
            await probe.command("LOGIN", quote(service),
                                quote(login.secret.reveal() if login.secret else ""))
            return True
        except SyncError:
            return False
        finally:
            await probe.close()

    async def select(self, mailbox: str, *, readonly: bool = True,
                     extra: Sequence[bytes] = ()) -> Response:
        return await self.command("EXAMINE" if readonly else "SELECT",
                                  quote(mailbox.encode("utf-8")), *extra)

    # ------------------------------------------------------------ sync commands

    async def enable(self, *extensions: str) -> set[str]:
        """ENABLE the extensions the server advertises (RFC 5161); return those enabled.

        QRESYNC implies CONDSTORE (RFC 7162 §3.2.3); a server without ENABLE gets nothing.
        """
        wanted = [e for e in extensions if e.upper() in self.capabilities]
        if not wanted or "ENABLE" not in self.capabilities:
            return set()
        response = await self.command("ENABLE", *(e.encode() for e in wanted))
        enabled: set[str] = set()
        for line in response.lines(b"ENABLED"):
            head = line[0] if isinstance(line[0], bytes) else line[0][0]
            enabled.update(head.decode(errors="replace").upper().split()[2:])
        return enabled

    async def status(self, mailbox: str, items: Sequence[str] = (
            "MESSAGES", "UIDNEXT", "UIDVALIDITY")) -> dict[str, int]:
        """STATUS of a mailbox that need not be selected (RFC 3501 §6.3.10)."""
        response = await self.command("STATUS", quote(mailbox.encode("utf-8")),
                                      b"(" + " ".join(items).encode() + b")")
        found: dict[str, int] = {}
        for line in response.lines(b"STATUS"):
            head = line[-1] if isinstance(line[-1], bytes) else line[-1][0]
            match = _STATUS_ITEMS.search(head)
            if match:
                words = match.group(1).decode().split()
                found.update({k.upper(): int(v) for k, v in zip(words[::2], words[1::2],
                                                                  strict=False)})
        return found

    async def append(self, mailbox: str, message: bytes, flags: Sequence[str] = ()) -> Response:
        """APPEND a message (sent as a literal; LITERAL+ when the server has it)."""
        args: list[bytes | Literal] = [quote(mailbox.encode("utf-8"))]
        if flags:
            args.append(b"(" + " ".join(flags).encode() + b")")
        return await self.command("APPEND", *args, Literal(message))

    async def uid(self, command: str, *args: bytes | Literal, check: bool = True) -> Response:
        """``UID FETCH|STORE|MOVE|COPY|SEARCH|EXPUNGE ...`` (RFC 3501 §6.4.8, RFC 6851, 4315)."""
        return await self.command(f"UID {command.upper()}", *args, check=check)

    async def pipeline(self, commands: Sequence[tuple[str, Sequence[bytes]]],
                       *, check: bool = True) -> list[Response]:
        """Send several commands at once, then read their answers in order (RFC 3501 §5.5).

        Pipelining keeps the server streaming while we read: one round trip for many
        ``UID FETCH`` ranges. Untagged data is attributed to the command being read when it
        arrives; callers key FETCH results by UID, not by command.
        """
        if self._writer is None:
            raise PermanentError("IMAP client is not connected", code="imap-state")
        tags: list[tuple[bytes, str]] = []
        chunk = b""
        for name, args in commands:
            tag = self._next_tag()
            tags.append((tag, name))
            chunk += tag + b" " + name.encode() + b"".join(b" " + a for a in args) + b"\r\n"
        with translated(self.endpoint, "IMAP"):
            await self._send(chunk)
            return [await self._collect(tag, name, check) for tag, name in tags]

    async def idle_once(self, wait: float) -> list[bytes]:
        """IDLE until the server reports a change or ``wait`` seconds pass (RFC 2177).

        Returns the untagged lines received (``* 12 EXISTS``, ``* 3 EXPUNGE``, ...), empty
        after a quiet timeout. The folder must be selected; the session is usable again
        afterwards (DONE has been answered).
        """
        if "IDLE" not in self.capabilities:
            raise PermanentError(f"IMAP server at {self.endpoint.host} has no IDLE",
                                 fix="poll instead", code="idle-unavailable")
        tag = self._next_tag()
        events: list[bytes] = []
        with translated(self.endpoint, "IMAP"):
            await self._send(tag + b" IDLE\r\n")
            await self._expect_continuation()
            assert self._reader is not None
            try:
                while True:
                    line = await asyncio.wait_for(self._reader.readuntil(b"\r\n"), wait)
                    head = line[:-2]
                    if head.startswith(b"* "):
                        events.append(head)
                        if _IDLE_EVENT.search(head):
                            break
            except TimeoutError:
                pass
            await self._send(b"DONE\r\n")
            await self._collect(tag, "IDLE", True)
        return events

    async def idle(self, *, refresh: float = 29 * 60) -> AsyncIterator[list[bytes]]:
        """Yield the change notifications of the selected folder, forever (IMAP push).

        Re-issues IDLE every ``refresh`` seconds (RFC 2177 asks clients to do so before
        30 minutes), so NAT boxes and servers do not drop a quiet connection.
        """
        while True:
            events = await self.idle_once(refresh)
            if events:
                yield events

    def usable(self) -> bool:
        """Whether a parked connection can take the next command (no I/O).

        The loop keeps reading an idle connection, so a server that closed it (``* BYE``,
        FIN) shows as EOF or as unread data; an idle authenticated session has nothing to
        say unasked (no mailbox is selected), so any buffered byte means it is not clean.
        """
        if self._writer is None or self._reader is None or self._writer.is_closing():
            return False
        # StreamReader has no public "bytes buffered" accessor
        return not self._reader.at_eof() and not getattr(self._reader, "_buffer", b"")

    async def logout(self) -> None:
        if self._writer is None:
            return
        try:
            await asyncio.wait_for(self.command("LOGOUT", check=False), 5)
        except (TimeoutError, SyncError, OSError):
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
