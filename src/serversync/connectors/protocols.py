"""The contracts between services and connectors, and the glossary they share.

Services never import a concrete connector; `serversync.wiring` picks one per server kind
and channel. Glossary:

* **Login** (`core.rules.Login`): how one connection authenticates — mode (own,
  impersonation, delegation, app), authentication identity, authorization identity.
* **probe**: a real connection that proves a channel can work (Test & Enable). It makes no
  changes a user would notice: it logs in, opens the folders, checks send rights with
  MAIL FROM / RCPT TO and RSET, and lists collections.
* **cursor**: where the last sync stopped (IMAP UIDVALIDITY/UID/MODSEQ, POP3 UIDLs, DAV
  sync-token, Graph deltaLink, EWS SyncState). Connectors *return* cursors; the store keeps
  them in the same transaction as the items they cover.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from serversync.connectors.net import ConnectOptions
from serversync.core.model import Channel, Mailbox, Profile
from serversync.core.rules import Login


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a successful probe found, for the Test & Enable report."""

    summary: str  # one line, e.g. "IMAP STARTTLS 127.0.0.1:10143, INBOX (12 messages)"


class Prober(Protocol):
    """Connects for real and raises a typed `core.errors.SyncError` on any failure."""

    async def __call__(self, profile: Profile, mailbox: Mailbox, channel: Channel,
                       login: Login, options: ConnectOptions) -> ProbeResult: ...


# ---------------------------------------------------------------- incoming mail sources


@dataclass(frozen=True, slots=True)
class FolderCursor:
    """Where incoming sync of one folder stopped. POP3 keeps its UIDLs as item links."""

    uidvalidity: int | None = None
    last_uid: int = 0
    highest_modseq: int | None = None


@dataclass(frozen=True, slots=True)
class RemoteMessage:
    """One message as read from the server, not yet parsed.

    ``remote_id`` is stable for the life of the message in its folder:
    ``"<UIDVALIDITY>:<UID>"`` on IMAP, the UIDL on POP3.
    """

    folder: str
    remote_id: str
    raw: bytes
    uid: int | None = None
    internal_date: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class FetchBatch:
    """Messages plus the cursor that covers them: commit both in one transaction.

    ``reset`` says the folder's UIDVALIDITY changed: every earlier remote id of the folder
    is void and the folder is being read again from the start.
    """

    folder: str
    messages: Sequence[RemoteMessage]
    cursor: FolderCursor
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Disposition:
    """What to do on the server with one processed message (after the commit)."""

    remote_id: str
    action: str  # "leave" | "flag" | "move" | "delete"
    folder: str | None = None  # target of "move"


# Given remote ids, the subset already processed (POP3 has no ordered cursor).
KnownFilter = Callable[[Sequence[str]], Awaitable[set[str]]]


class MailSource(Protocol):
    """An incoming mailbox (IMAP, POP3): read new messages per folder, batch by batch.

    Sources make no decisions: they fetch, report cursors, and apply dispositions. The
    service commits each batch (activities, item links, cursor) in one transaction before
    asking for the next one, and only then calls `finish` for it; a crash anywhere replays
    the batch, and the item links make the replay a no-op.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def resolve_folder(self, folder: str) -> str:
        """The server's name for a configured folder; raises PermanentError when missing."""
        ...

    def fetch(self, folder: str, cursor: FolderCursor | None, *, batch_size: int,
              known: KnownFilter) -> AsyncIterator[FetchBatch]: ...

    async def finish(self, folder: str, dispositions: Sequence[Disposition]) -> None: ...
