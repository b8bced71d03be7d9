"""The mailbox's Sent folder over IMAP: copies of sent mail, and finding them again.

After the SMTP server accepted a message, a copy goes to the mailbox's Sent folder (the
reference system does the same on Exchange, ``SSSSaveOutgoingEmailToExchangeSentFolder``),
so the user's mail client shows it and incoming sync recognises it by Message-ID. The send
pipeline also asks this folder whether a message with a given Message-ID exists before it
decides the fate of an email a crashed run left in *Sending*.

The folder is the one flagged ``\\Sent`` (RFC 6154 SPECIAL-USE), else ``Sent``. Copies go
in with one MULTIAPPEND command per batch (RFC 3502) when the server offers it, with
LITERAL+ (RFC 7888) so a batch is a single write; each copy is flagged ``\\Seen`` and dated
with its Date header. Delegates reach the owner's folder through the shared namespace
(RFC 4314 rights ``i`` and ``r`` needed).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from serversync.connectors.imap import shared_folder
from serversync.connectors.imapwire import ImapClient, ImapNo, Literal, quote
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import PermanentError
from serversync.core.model import AccessMode, Endpoint
from serversync.core.rules import Login

DEFAULT_SENT = "Sent"
_LIST = re.compile(rb'^\* LIST \(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.+)$', re.IGNORECASE)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internal_date(value: dt.datetime) -> bytes:
    """RFC 3501 date-time: ``"07-Mar-2025 14:03:09 +0000"``."""
    value = value.astimezone(dt.UTC)
    return (f'"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} '
            f'{value:%H:%M:%S} +0000"').encode()


def _unquote(raw: bytes) -> str:
    if raw.startswith(b'"') and raw.endswith(b'"'):
        raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
    return raw.decode("utf-8", errors="replace")


class SentFolder:
    """One IMAP connection to one mailbox's Sent folder. Constructing it does no I/O."""

    def __init__(self, endpoint: Endpoint, login: Login, options: ConnectOptions) -> None:
        self.endpoint = endpoint
        self.login = login
        self.options = options
        self.client = ImapClient(endpoint, options)
        self.folder: str | None = None
        self._selected = False

    async def open(self) -> str:
        """Connect, log in and find the Sent folder; return its name."""
        await self.client.connect()
        await self.client.login(self.login)
        self.folder = await self._find_sent()
        return self.folder

    async def _find_sent(self) -> str:
        if self.login.mode is AccessMode.DELEGATION:
            return shared_folder(self.options, self.login.target, DEFAULT_SENT)[0]
        if "SPECIAL-USE" in self.client.capabilities:
            response = await self.client.command("LIST", b'""', b'"*"', b"RETURN",
                                                 b"(SPECIAL-USE)", check=False)
            for line in response.untagged:
                head = line[0] if isinstance(line[0], bytes) else line[0][0]
                match = _LIST.match(head)
                if match and b"\\sent" in match.group(1).lower():
                    if isinstance(line[0], tuple):  # the name came as a literal
                        return line[0][1].decode("utf-8", errors="replace")
                    return _unquote(match.group(2))
        return DEFAULT_SENT

    async def append(self, messages: Sequence[tuple[bytes, dt.datetime]]) -> None:
        """Store copies, flagged \\Seen; one MULTIAPPEND command when the server has it."""
        if not messages:
            return
        assert self.folder is not None, "open() first"
        mailbox = quote(self.folder.encode("utf-8"))
        batches: list[Sequence[tuple[bytes, dt.datetime]]] = (
            [messages] if "MULTIAPPEND" in self.client.capabilities else [[m] for m in messages])
        for batch in batches:
            args: list[bytes | Literal] = [mailbox]
            for raw, date in batch:
                args += [b"(\\Seen)", internal_date(date), Literal(raw)]
            try:
                await self.client.command("APPEND", *args)
            except ImapNo as exc:
                if exc.response_code == "TRYCREATE" and self.login.mode is not \
                        AccessMode.DELEGATION:
                    await self.client.command("CREATE", mailbox)
                    await self.client.command("APPEND", *args)
                    continue
                raise PermanentError(
                    f"the Sent folder {self.folder!r} of {self.login.target} refused the copy "
                    f"({exc.text})",
                    fix="check that the folder exists and the login may append to it "
                        "(delegates need the 'i' right), or turn saving to Sent off",
                    code="sent-copy-refused") from None
        self._selected = False  # a new message: a later search must see it

    async def contains(self, message_id: str) -> bool:
        """Whether a message with this Message-ID is in the Sent folder."""
        assert self.folder is not None, "open() first"
        if not self._selected:
            await self.client.select(self.folder, readonly=True)
            self._selected = True
        else:
            await self.client.command("NOOP")
        response = await self.client.uid("SEARCH", b"HEADER", b"Message-ID",
                                         quote(message_id.encode()))
        for line in response.lines(b"SEARCH"):
            head = line[0] if isinstance(line[0], bytes) else line[0][0]
            if head.split()[2:]:
                return True
        return False

    async def close(self) -> None:
        await self.client.logout()
