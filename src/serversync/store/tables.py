"""The foundation's tables: profiles, mailboxes, the directory, alerts, org settings.

SQLAlchemy 2 declarative models with typed ``Mapped[]`` columns. They never leave the
store: `store.repos` converts them to and from `core.model` types. Secret columns hold
`store.crypto` ciphertext only. Other parts of the system add their own table modules
(activities, outbox, items, runs) on the same `Base`, each with its own migration.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON,
                           list[str]: JSON}


class Timestamped:
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now(),
                                                    onupdate=func.now())


class ProfileRow(Timestamped, Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(Text, default="")
    incoming_host: Mapped[str | None] = mapped_column(String(255))
    incoming_port: Mapped[int | None] = mapped_column(Integer)
    incoming_tls: Mapped[str | None] = mapped_column(String(10))
    outgoing_host: Mapped[str | None] = mapped_column(String(255))
    outgoing_port: Mapped[int | None] = mapped_column(Integer)
    outgoing_tls: Mapped[str | None] = mapped_column(String(10))
    credential_source: Mapped[str] = mapped_column(String(10))
    service_user: Mapped[str | None] = mapped_column(String(255))
    service_secret: Mapped[str | None] = mapped_column(Text)
    use_impersonation: Mapped[bool] = mapped_column(Boolean, default=False)
    impersonation_method: Mapped[str] = mapped_column(String(20), default="authzid")
    use_same_settings_for_outgoing: Mapped[bool] = mapped_column(Boolean, default=True)
    outgoing_credential_source: Mapped[str | None] = mapped_column(String(10))
    outgoing_service_user: Mapped[str | None] = mapped_column(String(255))
    outgoing_service_secret: Mapped[str | None] = mapped_column(Text)
    allow_plaintext: Mapped[bool] = mapped_column(Boolean, default=False)
    ca_file: Mapped[str | None] = mapped_column(Text)
    dav_url: Mapped[str | None] = mapped_column(Text)
    ews_url: Mapped[str | None] = mapped_column(Text)
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(255))
    client_secret: Mapped[str | None] = mapped_column(Text)
    client_certificate: Mapped[str | None] = mapped_column(Text)  # migration 0012
    token_url: Mapped[str | None] = mapped_column(Text)
    api_url: Mapped[str | None] = mapped_column(Text)
    shared_namespace: Mapped[str] = mapped_column(String(255), default="shared/{user}/")
    process_email_from: Mapped[dt.datetime | None]
    min_polling_interval_s: Mapped[int] = mapped_column(Integer, default=60)
    max_concurrent_connections: Mapped[int] = mapped_column(Integer, default=10)
    move_failed_to_folder: Mapped[str | None] = mapped_column(String(255))
    send_alert_email: Mapped[bool] = mapped_column(Boolean, default=False)
    alert_owner: Mapped[str | None] = mapped_column(String(255))
    connection_timeout_s: Mapped[float] = mapped_column(Float, default=30.0)
    impersonation_scope: Mapped[list[str]] = mapped_column(JSON, default=list)
    conflict_policy: Mapped[str] = mapped_column(String(30), default="application-wins")
    remove_unfiltered: Mapped[bool] = mapped_column(Boolean, default=False)

    mailboxes: Mapped[list[MailboxRow]] = relationship(back_populates="profile_row")


class MailboxRow(Timestamped, Base):
    __tablename__ = "mailboxes"

    id: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    owner_kind: Mapped[str] = mapped_column(String(10))
    owner: Mapped[str] = mapped_column(String(255))
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="RESTRICT"),
                                            index=True)
    incoming_method: Mapped[str] = mapped_column(String(20), default="none")
    incoming_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    incoming_status: Mapped[str] = mapped_column(String(10), default="not-run")
    outgoing_method: Mapped[str] = mapped_column(String(20), default="none")
    outgoing_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    outgoing_status: Mapped[str] = mapped_column(String(10), default="not-run")
    act_method: Mapped[str] = mapped_column(String(20), default="none")
    act_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    act_status: Mapped[str] = mapped_column(String(10), default="not-run")
    allow_credentials: Mapped[bool] = mapped_column(Boolean, default=False)
    username: Mapped[str | None] = mapped_column(String(255))
    secret: Mapped[str | None] = mapped_column(Text)
    approval: Mapped[str] = mapped_column(String(10), default="empty")
    process_email_from: Mapped[dt.datetime | None]
    after_processing: Mapped[str] = mapped_column(String(10), default="leave")
    after_processing_folder: Mapped[str | None] = mapped_column(String(255))
    tracking_rule: Mapped[str] = mapped_column(String(30), default="replies")
    folders: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["INBOX"])
    track_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    last_tested_at: Mapped[dt.datetime | None]

    profile_row: Mapped[ProfileRow] = relationship(back_populates="mailboxes")


class PartyRow(Base):
    __tablename__ = "parties"
    __table_args__ = (UniqueConstraint("kind", "key", name="uq_parties_kind_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    key: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255), default="")
    tracking_rule: Mapped[str] = mapped_column(String(30), default="replies")
    emails: Mapped[list[PartyEmailRow]] = relationship(
        cascade="all, delete-orphan", order_by="PartyEmailRow.position", lazy="selectin")


class PartyEmailRow(Base):
    """One address of a directory record; indexed for sender and recipient resolution."""

    __tablename__ = "party_emails"
    __table_args__ = (UniqueConstraint("party_id", "address", name="uq_party_emails_party"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    party_id: Mapped[int] = mapped_column(ForeignKey("parties.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class AlertRow(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(primary_key=True)
    severity: Mapped[str] = mapped_column(String(10))
    code: Mapped[str] = mapped_column(String(50), index=True)
    message: Mapped[str] = mapped_column(Text)
    fix: Mapped[str] = mapped_column(Text, default="")
    mailbox_id: Mapped[int | None] = mapped_column(
        ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str | None] = mapped_column(String(10))
    created_at: Mapped[dt.datetime] = mapped_column(index=True)
    resolved_at: Mapped[dt.datetime | None]


class SettingRow(Base):
    """Organisation-wide settings, one row per `core.model.OrgSettings` field."""

    __tablename__ = "org_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)


# Every column that holds `store.crypto` ciphertext, for `serversync rotate-key`. Table
# modules added later register theirs here too.
SECRET_COLUMNS: dict[type[Base], tuple[str, ...]] = {
    ProfileRow: ("service_secret", "outgoing_service_secret", "client_secret",
                 "client_certificate"),
    MailboxRow: ("secret",),
}
