"""Sync tokens of token-based servers: EWS SyncStates and Microsoft Graph delta links.

IMAP's cursor is three integers (``incoming_cursors``); EWS and Graph hand back an opaque
token instead — a SyncState (base64, often a few kilobytes) or a deltaLink URL — which does
not fit those columns. ``sync_tokens`` keeps it per (mailbox, channel, folder). The incoming
store reads and writes it together with the folder's cursor row, inside the batch's
transaction, so a token never runs ahead of the messages it covers.

A token is not a credential (it is a position in a change log, useless without an access
token), so it is stored in clear.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String, Text, UniqueConstraint, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.store.tables import Base


class SyncTokenRow(Base):
    __tablename__ = "sync_tokens"
    __table_args__ = (UniqueConstraint("mailbox_id", "channel", "folder",
                                       name="uq_sync_tokens_folder"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(20))  # "incoming" | "act"
    folder: Mapped[str] = mapped_column(String(255))
    token: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column()


class SyncTokens:
    """Read and write sync tokens in the caller's session (and transaction)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, mailbox_id: int, channel: str, folder: str) -> str | None:
        token: str | None = await self.session.scalar(select(SyncTokenRow.token).where(
            SyncTokenRow.mailbox_id == mailbox_id, SyncTokenRow.channel == channel,
            SyncTokenRow.folder == folder))
        return token

    async def put(self, mailbox_id: int, channel: str, folder: str, token: str | None,
                  now: dt.datetime) -> None:
        """Store ``token``; None forgets it (the next sync starts a full round)."""
        where = (SyncTokenRow.mailbox_id == mailbox_id, SyncTokenRow.channel == channel,
                 SyncTokenRow.folder == folder)
        if token is None:
            row = await self.session.scalar(select(SyncTokenRow).where(*where))
            if row is not None:
                await self.session.delete(row)
            return
        result = await self.session.execute(
            update(SyncTokenRow).where(*where).values(token=token, updated_at=now))
        if not getattr(result, "rowcount", 0):
            await self.session.execute(insert(SyncTokenRow).values(
                mailbox_id=mailbox_id, channel=channel, folder=folder, token=token,
                updated_at=now))
