"""Tables and queries of the web side: API tokens, admin UI sessions, webhooks and their outbox.

* ``api_tokens`` keeps only the SHA-256 of each token (see `core.access`), its role and
  when it was created, last used and revoked.
* ``web_sessions`` are the admin UI's sign-ins (a random cookie, stored hashed, tied to the
  token that signed in: revoking the token ends its sessions).
* ``webhooks`` hold the endpoint and its signing secret, encrypted with the keyring like
  every other secret column (AAD ``webhooks.secret``).
* ``webhook_deliveries`` is the outbox (the transactional-outbox pattern): an event is
  written in the same transaction as the change it reports, and a sender delivers it later,
  so deliveries survive restarts and are retried with backoff. ``dedupe_key`` is unique per
  webhook, so the source scanner can look at the same rows twice without sending twice.
* ``webhook_sources`` remember how far each source (alerts, tracked and sent email) was
  scanned.

`WebStore` is the only code that reads or writes these tables; it returns core types.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.core.access import ApiToken, Principal, Role
from serversync.core.errors import NotFound
from serversync.core.model import Severity
from serversync.core.times import as_utc as _utc_required
from serversync.core.times import utc as _utc
from serversync.core.webhooks import Delivery, DeliveryStatus, Event, Webhook
from serversync.store.crypto import Keyring
from serversync.store.emails import EmailRow
from serversync.store.tables import SECRET_COLUMNS, AlertRow, Base, MailboxRow, ProfileRow


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    role: Mapped[str] = mapped_column(String(10))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime]
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class WebSessionRow(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"),
                                          index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class WebhookRow(Base):
    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str | None] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime]


class WebhookDeliveryRow(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("webhook_id", "dedupe_key",
                                       name="uq_webhook_deliveries_dedupe"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"),
                                            index=True)
    event: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    dedupe_key: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(10), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    response_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime]
    delivered_at: Mapped[dt.datetime | None]


class WebhookSourceRow(Base):
    """How far the scanner got in one source table (alerts, tracked email, sent email)."""

    __tablename__ = "webhook_sources"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    floor_id: Mapped[int] = mapped_column(Integer)  # rows at or below it are history: never sent
    scanned_at: Mapped[dt.datetime]


SECRET_COLUMNS[WebhookRow] = ("secret",)


class WebStore:
    """Reads and writes tokens, sessions, webhooks and deliveries inside the caller's transaction."""

    def __init__(self, session: AsyncSession, keyring: Keyring) -> None:
        self.session = session
        self.keyring = keyring

    # ------------------------------------------------------------ tokens

    @staticmethod
    def _token(row: ApiTokenRow) -> ApiToken:
        return ApiToken(row.name, Role(row.role), row.prefix, _utc_required(row.created_at),
                        _utc(row.last_used_at), _utc(row.revoked_at), row.id)

    async def add_token(self, name: str, role: Role, digest: str, prefix: str,
                        now: dt.datetime) -> ApiToken:
        row = ApiTokenRow(name=name, role=role.value, token_hash=digest, prefix=prefix,
                          created_at=now)
        self.session.add(row)
        await self.session.flush()
        return self._token(row)

    async def list_tokens(self, *, include_revoked: bool = False) -> list[ApiToken]:
        query = select(ApiTokenRow).order_by(ApiTokenRow.name, ApiTokenRow.id)
        if not include_revoked:
            query = query.where(ApiTokenRow.revoked_at.is_(None))
        return [self._token(r) for r in await self.session.scalars(query)]

    async def active_token(self, name: str) -> ApiToken | None:
        row = await self.session.scalar(select(ApiTokenRow).where(
            ApiTokenRow.name == name, ApiTokenRow.revoked_at.is_(None)))
        return None if row is None else self._token(row)

    async def token_by_hash(self, digest: str) -> ApiToken | None:
        row = await self.session.scalar(select(ApiTokenRow).where(
            ApiTokenRow.token_hash == digest, ApiTokenRow.revoked_at.is_(None)))
        return None if row is None else self._token(row)

    async def touch_token(self, token_id: int, now: dt.datetime) -> None:
        await self.session.execute(
            update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(last_used_at=now))

    async def revoke_token(self, name: str, now: dt.datetime) -> int:
        result = await self.session.execute(
            update(ApiTokenRow).where(ApiTokenRow.name == name, ApiTokenRow.revoked_at.is_(None))
            .values(revoked_at=now))
        await self.session.execute(delete(WebSessionRow).where(WebSessionRow.token_id.in_(
            select(ApiTokenRow.id).where(ApiTokenRow.name == name))))
        return int(getattr(result, "rowcount", 0) or 0)

    # ------------------------------------------------------------ UI sessions

    async def add_session(self, digest: str, token_id: int, csrf: str, now: dt.datetime,
                          expires_at: dt.datetime) -> None:
        self.session.add(WebSessionRow(session_hash=digest, token_id=token_id, csrf=csrf,
                                       created_at=now, expires_at=expires_at))
        await self.session.execute(delete(WebSessionRow).where(WebSessionRow.expires_at < now))
        await self.session.flush()

    async def session_principal(self, digest: str, now: dt.datetime) -> Principal | None:
        found = (await self.session.execute(
            select(WebSessionRow, ApiTokenRow).join(ApiTokenRow)
            .where(WebSessionRow.session_hash == digest, WebSessionRow.expires_at > now,
                   ApiTokenRow.revoked_at.is_(None)))).first()
        if found is None:
            return None
        session, token = found
        return Principal(token.name, Role(token.role), token.id, session.csrf)

    async def delete_session(self, digest: str) -> None:
        await self.session.execute(
            delete(WebSessionRow).where(WebSessionRow.session_hash == digest))

    # ------------------------------------------------------------ webhooks

    def _webhook(self, row: WebhookRow) -> Webhook:
        secret = None if row.secret is None else self.keyring.decrypt(row.secret,
                                                                      "webhooks.secret")
        known = {e.value for e in Event}
        return Webhook(row.url, tuple(Event(e) for e in row.events if e in known), secret,
                       row.active, row.description, _utc_required(row.created_at), row.id)

    async def add_webhook(self, webhook: Webhook) -> Webhook:
        row = WebhookRow(url=webhook.url, events=[e.value for e in webhook.events],
                         secret=None if webhook.secret is None
                         else self.keyring.encrypt(webhook.secret, "webhooks.secret"),
                         active=webhook.active, description=webhook.description,
                         created_at=webhook.created_at)
        self.session.add(row)
        await self.session.flush()
        return self._webhook(row)

    async def _webhook_row(self, webhook_id: int) -> WebhookRow:
        row = await self.session.get(WebhookRow, webhook_id)
        if row is None:
            raise NotFound(f"no webhook {webhook_id}", fix="list them with GET /api/v1/webhooks")
        return row

    async def get_webhook(self, webhook_id: int) -> Webhook:
        return self._webhook(await self._webhook_row(webhook_id))

    async def list_webhooks(self) -> list[Webhook]:
        return [self._webhook(r) for r in
                await self.session.scalars(select(WebhookRow).order_by(WebhookRow.id))]

    async def set_webhook_active(self, webhook_id: int, active: bool) -> Webhook:
        row = await self._webhook_row(webhook_id)
        row.active = active
        await self.session.flush()
        return self._webhook(row)

    async def delete_webhook(self, webhook_id: int) -> None:
        await self.session.delete(await self._webhook_row(webhook_id))

    # ------------------------------------------------------------ deliveries (the outbox)

    @staticmethod
    def _delivery(row: WebhookDeliveryRow) -> Delivery:
        return Delivery(row.webhook_id, Event(row.event), dict(row.payload),
                        DeliveryStatus(row.status), row.attempts,
                        _utc(row.next_attempt_at), row.last_error, row.response_status,
                        _utc_required(row.created_at), _utc(row.delivered_at), row.id)

    async def existing_keys(self, keys: Iterable[str]) -> set[tuple[int, str]]:
        wanted = list(set(keys))
        if not wanted:
            return set()
        rows = await self.session.execute(
            select(WebhookDeliveryRow.webhook_id, WebhookDeliveryRow.dedupe_key)
            .where(WebhookDeliveryRow.dedupe_key.in_(wanted)))
        return {(w, k) for w, k in rows.all() if k is not None}

    async def enqueue(self, webhook_id: int, event: Event, payload: dict[str, Any],
                      now: dt.datetime, dedupe_key: str | None = None) -> None:
        self.session.add(WebhookDeliveryRow(
            webhook_id=webhook_id, event=event.value, payload=payload, dedupe_key=dedupe_key,
            status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now,
            last_error="", created_at=now))

    async def due(self, now: dt.datetime, limit: int) -> list[Delivery]:
        rows = await self.session.scalars(
            select(WebhookDeliveryRow)
            .where(WebhookDeliveryRow.status == DeliveryStatus.PENDING.value,
                   WebhookDeliveryRow.next_attempt_at <= now)
            .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.id).limit(limit))
        return [self._delivery(r) for r in rows]

    async def claim(self, delivery_id: int, seen_next: dt.datetime,
                    lease_until: dt.datetime) -> bool:
        """Take a delivery for one sender: move its next attempt past the lease, if still due.

        A compare-and-set on ``next_attempt_at``: of two workers that saw the same row, one
        update matches and the other's does not, and no transaction stays open during the
        HTTP request. A sender that dies mid-request leaves the row due again at the lease's
        end (at-least-once; receivers deduplicate on the delivery id).
        """
        result = await self.session.execute(
            update(WebhookDeliveryRow)
            .where(WebhookDeliveryRow.id == delivery_id,
                   WebhookDeliveryRow.status == DeliveryStatus.PENDING.value,
                   WebhookDeliveryRow.next_attempt_at == seen_next)
            .values(next_attempt_at=lease_until))
        return bool(getattr(result, "rowcount", 0))

    async def record(self, delivery_id: int, *, status: DeliveryStatus, attempts: int,
                     next_attempt_at: dt.datetime, error: str, response_status: int | None,
                     delivered_at: dt.datetime | None) -> None:
        await self.session.execute(
            update(WebhookDeliveryRow).where(WebhookDeliveryRow.id == delivery_id).values(
                status=status.value, attempts=attempts, next_attempt_at=next_attempt_at,
                last_error=error[:2000], response_status=response_status,
                delivered_at=delivered_at))

    async def list_deliveries(self, webhook_id: int | None = None,
                              limit: int = 100) -> list[Delivery]:
        query = select(WebhookDeliveryRow).order_by(WebhookDeliveryRow.id.desc()).limit(limit)
        if webhook_id is not None:
            query = query.where(WebhookDeliveryRow.webhook_id == webhook_id)
        return [self._delivery(r) for r in await self.session.scalars(query)]

    # ------------------------------------------------------------ sources for the scanner

    async def source(self, name: str) -> WebhookSourceRow | None:
        return await self.session.get(WebhookSourceRow, name)

    async def set_source(self, name: str, floor_id: int, scanned_at: dt.datetime) -> None:
        await self.session.merge(WebhookSourceRow(name=name, floor_id=floor_id,
                                                  scanned_at=scanned_at))

    async def max_id(self, name: str) -> int:
        column = AlertRow.id if name == "alerts" else EmailRow.id
        return int(await self.session.scalar(select(func.coalesce(func.max(column), 0))) or 0)

    async def new_alerts(self, floor_id: int, since: dt.datetime,
                         limit: int) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            select(AlertRow, MailboxRow.address, ProfileRow.name)
            .outerjoin(MailboxRow, AlertRow.mailbox_id == MailboxRow.id)
            .outerjoin(ProfileRow, AlertRow.profile_id == ProfileRow.id)
            .where(AlertRow.id > floor_id, AlertRow.created_at >= since)
            .order_by(AlertRow.id).limit(limit))
        return [{"id": a.id, "severity": Severity(a.severity).value, "code": a.code,
                 "message": a.message, "fix": a.fix, "mailbox": m, "profile": p,
                 "channel": a.channel, "created_at": _utc_required(a.created_at).isoformat()}
                for a, m, p in rows.all()]

    async def new_emails(self, floor_id: int, since: dt.datetime, *, direction: str,
                         statuses: Sequence[str], limit: int) -> list[dict[str, Any]]:
        stamp = EmailRow.created_at if direction == "incoming" else EmailRow.updated_at
        rows = await self.session.scalars(
            select(EmailRow).where(and_(
                EmailRow.id > floor_id, EmailRow.direction == direction,
                EmailRow.status.in_(list(statuses)), stamp >= since))
            .order_by(EmailRow.id).limit(limit))
        return [{"id": r.id, "direction": r.direction, "status": r.status, "subject": r.subject,
                 "sender": r.sender, "message_id": r.message_id, "owner": r.owner,
                 "sender_mailbox": r.sender_mailbox,
                 "recipients": [{"role": x.role, "address": x.address} for x in r.recipients]}
                for r in rows]

    # ------------------------------------------------------------ overview figures

    async def channel_counts(self) -> list[tuple[str, str, bool, str, int]]:
        """(channel, method, enabled, status, mailboxes) for every combination present."""
        out: list[tuple[str, str, bool, str, int]] = []
        for channel in ("incoming", "outgoing", "act"):
            method = getattr(MailboxRow, f"{channel}_method")
            enabled = getattr(MailboxRow, f"{channel}_enabled")
            status = getattr(MailboxRow, f"{channel}_status")
            rows = await self.session.execute(
                select(method, enabled, status, func.count()).group_by(method, enabled, status))
            out.extend((channel, m, bool(e), s, int(n)) for m, e, s, n in rows.all())
        return out

    async def approval_counts(self) -> dict[str, int]:
        rows = await self.session.execute(
            select(MailboxRow.approval, func.count()).group_by(MailboxRow.approval))
        return {a: int(n) for a, n in rows.all()}

    async def open_alert_counts(self) -> dict[str, int]:
        rows = await self.session.execute(
            select(AlertRow.severity, func.count()).where(AlertRow.resolved_at.is_(None))
            .group_by(AlertRow.severity))
        return {s: int(n) for s, n in rows.all()}

    async def resolve_alert(self, alert_id: int, now: dt.datetime) -> bool:
        result = await self.session.execute(
            update(AlertRow).where(AlertRow.id == alert_id, AlertRow.resolved_at.is_(None))
            .values(resolved_at=now))
        return bool(getattr(result, "rowcount", 0))
