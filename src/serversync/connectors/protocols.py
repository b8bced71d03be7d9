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
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from serversync.connectors.net import ConnectOptions
from serversync.core.act import ItemKind, Record
from serversync.core.errors import ItemError
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
    # Opaque server cursor of token-based sources: EWS SyncState, Graph deltaLink.
    token: str | None = None


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
              known: KnownFilter) -> AsyncGenerator[FetchBatch, None]: ...

    async def finish(self, folder: str, dispositions: Sequence[Disposition]) -> None: ...


# ---------------------------------------------------------------- appointments, contacts, tasks

@dataclass(frozen=True, slots=True)
class ItemCollection:
    """One server collection that holds items of some kinds (a calendar, a task list, an
    address book; an EWS or Graph folder). ``href`` is its stable id on the server."""

    href: str
    kinds: frozenset[ItemKind]
    name: str = ""


@dataclass(frozen=True, slots=True)
class ItemChanges:
    """What changed in a collection since ``token``. With ``complete`` the listing is the
    whole collection (first sync, an expired token, or a server without change tracking):
    every item not in ``changed`` is gone, and ``deleted`` is empty."""

    token: str | None  # the cursor to store once these changes are applied
    changed: Sequence[tuple[str, str]]  # (href, etag) of new or changed items
    deleted: Sequence[str]  # hrefs
    complete: bool = False


@dataclass(frozen=True, slots=True)
class FetchedItem:
    """One item read from the server: its record, or why it cannot be read (``problem``), and
    the raw data either way so that a bad item can be quarantined as it was."""

    href: str
    etag: str
    raw: bytes
    record: Record | None
    problem: str = ""


@dataclass(frozen=True, slots=True)
class WrittenItem:
    href: str
    etag: str | None  # None when the server did not return one (read it on the next sync)
    hash: str  # `core.act.content_hash` of the record as the server now holds it


class PreconditionFailed(ItemError):
    """If-Match / If-None-Match failed: the server's copy changed under us. Item-level: skip
    the item, the next sync sees the change and plans again."""


class ItemStore(Protocol):
    """A user's appointments, contacts and tasks on a server (CalDAV/CardDAV, EWS, Graph).

    Stores make no decisions: they list changes since a cursor, read items in bulk, and write
    or delete one item guarded by its etag. The planner (`core.plan`) decides; the service
    keeps status and cursors in its own transaction.
    """

    async def collections(self, kinds: Sequence[ItemKind]) -> dict[ItemKind, ItemCollection]:
        """The collection to sync for each kind, created when the user has none."""
        ...

    async def changes(self, collection: ItemCollection, token: str | None) -> ItemChanges: ...

    async def get_many(self, collection: ItemCollection,
                       hrefs: Sequence[str]) -> list[FetchedItem]: ...

    async def put(self, collection: ItemCollection, record: Record, *, href: str | None,
                  if_match: str | None, invitations: bool) -> WrittenItem:
        """Create (``href`` None: If-None-Match) or replace (If-Match ``if_match``) one item."""
        ...

    async def delete(self, href: str, *, if_match: str | None) -> None:
        """Delete one item; an item already gone is not an error."""
        ...
