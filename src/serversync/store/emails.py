"""Email activities in the database: messages, their addresses, attachments and blobs.

Attachment content lives in a ``blobs`` table keyed by SHA-256, so the same file sent to
many people is stored once and rows stay small. `EmailStore` is the only code that reads or
writes these tables; it returns `core.email` types.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column, relationship

from serversync.core.email import (
    Attachment,
    CorrelationMethod,
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
    Regarding,
    Role,
)
from serversync.core.errors import NotFound
from serversync.core.times import utc as _utc
from serversync.store import blobfiles
from serversync.store.tables import Base


class EmailRow(Base):
    __tablename__ = "emails"

    id: Mapped[int] = mapped_column(primary_key=True)
    direction: Mapped[str] = mapped_column(String(10), index=True)
    status: Mapped[str] = mapped_column(String(15), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    sender: Mapped[str] = mapped_column(String(320), index=True)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[list[str]] = mapped_column(JSON, default=list)
    conversation_id: Mapped[str | None] = mapped_column(String(255), index=True)
    tracking_token: Mapped[str | None] = mapped_column(String(50), index=True)
    sent_at: Mapped[dt.datetime | None]
    received_at: Mapped[dt.datetime | None]
    body_text: Mapped[str] = mapped_column(Text, default="")
    body_html: Mapped[str] = mapped_column(Text, default="")
    owner_kind: Mapped[str | None] = mapped_column(String(10))
    owner: Mapped[str | None] = mapped_column(String(255))
    regarding_kind: Mapped[str | None] = mapped_column(String(50))
    regarding_key: Mapped[str | None] = mapped_column(String(255))
    correlated_to: Mapped[int | None] = mapped_column(ForeignKey("emails.id", ondelete="SET NULL"))
    correlation: Mapped[str] = mapped_column(String(20), default="none")
    sender_mailbox: Mapped[str | None] = mapped_column(String(320), index=True)
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    notices: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    recipients: Mapped[list[EmailRecipientRow]] = relationship(
        cascade="all, delete-orphan", order_by="EmailRecipientRow.position", lazy="selectin")
    attachments: Mapped[list[AttachmentRow]] = relationship(
        cascade="all, delete-orphan", order_by="AttachmentRow.position", lazy="selectin")


class EmailRecipientRow(Base):
    __tablename__ = "email_recipients"

    id: Mapped[int] = mapped_column(primary_key=True)
    email_id: Mapped[int] = mapped_column(ForeignKey("emails.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(10))
    address: Mapped[str] = mapped_column(String(320), index=True)
    name: Mapped[str] = mapped_column(Text, default="")
    party_kind: Mapped[str | None] = mapped_column(String(10))
    party_key: Mapped[str | None] = mapped_column(String(255))


class BlobRow(Base):
    """Content-addressed bytes (attachments, raw messages kept for audit).

    With a ``location`` the bytes are a file of the blob directory (`store.blobfiles`) and
    ``content`` is empty; without one they are ``content``.
    """

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    location: Mapped[str | None] = mapped_column(String(80))


class AttachmentRow(Base):
    __tablename__ = "email_attachments"

    id: Mapped[int] = mapped_column(primary_key=True)
    email_id: Mapped[int] = mapped_column(ForeignKey("emails.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text, default="")
    content_type: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    size: Mapped[int] = mapped_column(Integer, default=0)
    content_id: Mapped[str | None] = mapped_column(String(998))
    blob_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"))
    notice: Mapped[str] = mapped_column(Text, default="")


class EmailStore:
    """Reads and writes email activities inside the caller's transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def put_blob(self, content: bytes) -> str:
        """Store bytes once by their SHA-256; return the hash."""
        digest = hashlib.sha256(content).hexdigest()
        if await self.session.get(BlobRow, digest) is None:
            self.session.add(BlobRow(sha256=digest, size=len(content), content=content))
            await self.session.flush()
        return digest

    async def get_blob(self, digest: str) -> bytes:
        row = await self.session.get(BlobRow, digest)
        if row is None:
            raise NotFound(f"no blob {digest}")
        if row.location is not None:
            return await blobfiles.read(self.session, row.location)
        return row.content

    async def add(self, activity: EmailActivity) -> EmailActivity:
        row = EmailRow()
        await self._fill(row, activity)
        self.session.add(row)
        await self.session.flush()
        return dataclasses.replace(activity, id=row.id)

    async def _fill(self, row: EmailRow, a: EmailActivity) -> None:
        row.direction, row.status, row.subject, row.sender = (
            a.direction.value, a.status.value, a.subject, a.sender)
        row.message_id, row.in_reply_to, row.references = (
            a.message_id, a.in_reply_to, list(a.references))
        row.conversation_id, row.tracking_token = a.conversation_id, a.tracking_token
        row.sent_at, row.received_at = a.sent_at, a.received_at
        row.body_text, row.body_html = a.body_text, a.body_html
        row.owner_kind, row.owner = a.owner_kind, a.owner
        row.regarding_kind = a.regarding.kind if a.regarding else None
        row.regarding_key = a.regarding.key if a.regarding else None
        row.correlated_to, row.correlation = a.correlated_to, a.correlation.value
        row.sender_mailbox, row.content_hash = a.sender_mailbox, a.content_hash
        row.notices, row.created_at = list(a.notices), a.created_at
        row.recipients = [
            EmailRecipientRow(position=i, role=r.role.value, address=r.address.lower(),
                              name=r.name, party_kind=r.party_kind, party_key=r.party_key)
            for i, r in enumerate(a.recipients)]
        attachments = []
        for i, att in enumerate(a.attachments):
            digest = await self.put_blob(att.content) if att.content is not None else None
            attachments.append(AttachmentRow(
                position=i, name=att.name, content_type=att.content_type, size=att.size,
                content_id=att.content_id, blob_sha256=digest, notice=att.notice))
        row.attachments = attachments

    def _activity(self, row: EmailRow, contents: dict[str, bytes] | None = None) -> EmailActivity:
        contents = contents or {}
        return EmailActivity(
            direction=Direction(row.direction), status=EmailStatus(row.status),
            subject=row.subject, sender=row.sender,
            recipients=tuple(Recipient(Role(r.role), r.address, r.name, r.party_kind, r.party_key)
                             for r in row.recipients),
            message_id=row.message_id, in_reply_to=row.in_reply_to,
            references=tuple(row.references or ()), conversation_id=row.conversation_id,
            tracking_token=row.tracking_token, sent_at=_utc(row.sent_at),
            received_at=_utc(row.received_at), body_text=row.body_text, body_html=row.body_html,
            attachments=tuple(Attachment(a.name, a.content_type, a.size,
                                         contents.get(a.blob_sha256 or ""), a.content_id, a.notice)
                              for a in row.attachments),
            owner_kind=row.owner_kind, owner=row.owner,
            regarding=Regarding(row.regarding_kind, row.regarding_key)
            if row.regarding_kind and row.regarding_key else None,
            correlated_to=row.correlated_to, correlation=CorrelationMethod(row.correlation),
            sender_mailbox=row.sender_mailbox, content_hash=row.content_hash,
            notices=tuple(row.notices or ()), created_at=_utc(row.created_at) or row.created_at,
            id=row.id)

    async def get(self, email_id: int, *, with_content: bool = False) -> EmailActivity:
        row = await self.session.get(EmailRow, email_id)
        if row is None:
            raise NotFound(f"no email activity {email_id}")
        contents: dict[str, bytes] = {}
        if with_content:
            for att in row.attachments:
                if att.blob_sha256:
                    contents[att.blob_sha256] = await self.get_blob(att.blob_sha256)
        return self._activity(row, contents)

    async def get_many(self, email_ids: Sequence[int], *,
                       with_content: bool = False) -> dict[int, EmailActivity]:
        """Several activities in a few queries (rows, then every needed blob at once)."""
        if not email_ids:
            return {}
        rows = list(await self.session.scalars(
            select(EmailRow).where(EmailRow.id.in_(list(email_ids)))))
        contents: dict[str, bytes] = {}
        if with_content:
            digests = {a.blob_sha256 for r in rows for a in r.attachments if a.blob_sha256}
            if digests:
                found = await self.session.execute(
                    select(BlobRow.sha256, BlobRow.content, BlobRow.location)
                    .where(BlobRow.sha256.in_(digests)))
                for digest, content, location in found.all():
                    contents[digest] = content if location is None else \
                        await blobfiles.read(self.session, location)
        return {r.id: self._activity(r, contents) for r in rows}

    async def find_by_message_id(self, message_id: str) -> EmailActivity | None:
        row = await self.session.scalar(
            select(EmailRow).where(EmailRow.message_id == message_id).order_by(EmailRow.id)
            .limit(1))
        return None if row is None else self._activity(row)

    async def ids_by_message_ids(self, message_ids: Sequence[str]) -> dict[str, int]:
        """Message-ID → earliest activity id, for correlation and duplicate checks (one query)."""
        if not message_ids:
            return {}
        rows = await self.session.execute(
            select(EmailRow.message_id, func.min(EmailRow.id))
            .where(EmailRow.message_id.in_(list(set(message_ids))))
            .group_by(EmailRow.message_id))
        return {m: i for m, i in rows.all() if m is not None}

    async def list(self, *, direction: Direction | None = None,
                   status: EmailStatus | None = None, sender_mailbox: str | None = None,
                   limit: int = 100, before_id: int | None = None) -> list[EmailActivity]:
        query = select(EmailRow).order_by(EmailRow.id.desc()).limit(limit)
        filters: list[Any] = []
        if direction is not None:
            filters.append(EmailRow.direction == direction.value)
        if status is not None:
            filters.append(EmailRow.status == status.value)
        if sender_mailbox is not None:
            filters.append(EmailRow.sender_mailbox == sender_mailbox)
        if before_id is not None:
            filters.append(EmailRow.id < before_id)
        return [self._activity(r) for r in await self.session.scalars(query.where(*filters))]

    async def set_status(self, email_id: int, status: EmailStatus,
                         expected: EmailStatus | None = None) -> bool:
        """Change the status; with ``expected``, only if it still has that status."""
        query = update(EmailRow).where(EmailRow.id == email_id)
        if expected is not None:
            query = query.where(EmailRow.status == expected.value)
        result = await self.session.execute(query.values(status=status.value))
        return bool(getattr(result, "rowcount", 0))
