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
