"""Sync tokens of token-based servers: EWS SyncStates and Microsoft Graph delta links.

IMAP's cursor is three integers (``incoming_cursors``); EWS and Graph hand back an opaque
token instead — a SyncState (base64, often a few kilobytes) or a deltaLink URL — which does
not fit those columns. ``sync_tokens`` keeps it per (mailbox, channel, folder). The incoming
store reads and writes it together with the folder's cursor row, inside the batch's
transaction, so a token never runs ahead of the messages it covers.

A token is not a credential (it is a position in a change log, useless without an access
token), so it is stored in clear.

``graph_subscriptions`` (migration ``0010``) keeps the Graph change-notification
subscription of each Exchange Online mailbox (`services.graph_subscriptions`): its id,
resource, expiry, the SHA-256 of its clientState — never the clientState itself — and
(migration ``0012``) the lifecycleNotificationUrl it was created with.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import (
    ForeignKey,
    String,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.core.times import as_utc as _utc
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


class GraphSubscriptionRow(Base):
    """A Microsoft Graph change-notification subscription we created for a mailbox.

    ``mailbox`` and ``profile`` are names, not foreign keys: when a mailbox is deleted or
    moved to another profile, the row must outlive it so that the subscription can still be
    deleted on Graph with the profile's credentials. The clientState sent to Graph is a
    random secret that is never stored: only its SHA-256 (``client_state_hash``) is kept,
    which is all that checking a notification needs (a renewal does not resend it).
    """

    __tablename__ = "graph_subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(320), unique=True)
    profile: Mapped[str] = mapped_column(String(255))
    subscription_id: Mapped[str] = mapped_column(String(255), unique=True)
    resource: Mapped[str] = mapped_column(Text)
    notification_url: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[dt.datetime] = mapped_column()
    client_state_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column()
    lifecycle_url: Mapped[str | None] = mapped_column(Text)  # None: made without one


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    mailbox: str
    profile: str
    subscription_id: str
    resource: str
    notification_url: str
    expires_at: dt.datetime
    client_state_hash: str
    lifecycle_url: str | None = None


def _stored(row: GraphSubscriptionRow) -> StoredSubscription:
    return StoredSubscription(row.mailbox, row.profile, row.subscription_id, row.resource,
                              row.notification_url, _utc(row.expires_at),
                              row.client_state_hash, row.lifecycle_url)


class GraphSubscriptions:
    """Read and write `graph_subscriptions` in the caller's session (and transaction)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def all(self) -> list[StoredSubscription]:
        rows = await self.session.scalars(
            select(GraphSubscriptionRow).order_by(GraphSubscriptionRow.mailbox))
        return [_stored(r) for r in rows]

    async def by_id(self, subscription_id: str) -> StoredSubscription | None:
        row = await self.session.scalar(select(GraphSubscriptionRow).where(
            GraphSubscriptionRow.subscription_id == subscription_id))
        return _stored(row) if row is not None else None

    async def put(self, subscription: StoredSubscription, now: dt.datetime) -> None:
        """Insert or replace the mailbox's subscription (one per mailbox)."""
        values = {"profile": subscription.profile,
                  "subscription_id": subscription.subscription_id,
                  "resource": subscription.resource,
                  "notification_url": subscription.notification_url,
                  "expires_at": subscription.expires_at,
                  "client_state_hash": subscription.client_state_hash,
                  "lifecycle_url": subscription.lifecycle_url, "updated_at": now}
        result = await self.session.execute(update(GraphSubscriptionRow).where(
            GraphSubscriptionRow.mailbox == subscription.mailbox).values(**values))
        if not getattr(result, "rowcount", 0):
            await self.session.execute(insert(GraphSubscriptionRow).values(
                mailbox=subscription.mailbox, **values))

    async def make_due(self, subscription_id: str, now: dt.datetime) -> None:
        """Mark a subscription as needing renewal now (``expires_at`` = ``now`` at the latest).

        This is how a lifecycle event is persisted before it is answered: should the
        immediate reauthorization or re-creation be lost, the next ``ensure`` round renews
        the subscription (which reauthorizes it) or, when Graph no longer knows it, creates it
        again.
        """
        await self.session.execute(update(GraphSubscriptionRow).where(
            GraphSubscriptionRow.subscription_id == subscription_id,
            GraphSubscriptionRow.expires_at > now).values(expires_at=now, updated_at=now))

    async def forget(self, mailbox: str) -> None:
        await self.session.execute(delete(GraphSubscriptionRow).where(
            GraphSubscriptionRow.mailbox == mailbox))
