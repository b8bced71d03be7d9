"""appointments, contacts, tasks and their two-way sync state

Revision ID: 0005
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "act_appointments",
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("start", sa.String(length=40), nullable=False),
        sa.Column("end", sa.String(length=40), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("all_day", sa.Boolean(), nullable=False),
        sa.Column("organizer", sa.String(length=320), nullable=False),
        sa.Column("rrule", sa.Text(), nullable=False),
        sa.Column("cancelled", sa.JSON(), nullable=False),
        sa.Column("occurrences", sa.JSON(), nullable=False),
        sa.Column("reminder_minutes", sa.Integer(), nullable=True),
        sa.Column("busy", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("series_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=320), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_appointments")),
        sa.UniqueConstraint("uid", name=op.f("uq_act_appointments_uid")),
    )
    with op.batch_alter_table("act_appointments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_appointments_deleted_at"), ["deleted_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_appointments_organizer"), ["organizer"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_appointments_owner"), ["owner"], unique=False)

    op.create_table(
        "act_contacts",
        sa.Column("full_name", sa.Text(), nullable=False),
        sa.Column("given_name", sa.Text(), nullable=False),
        sa.Column("family_name", sa.Text(), nullable=False),
        sa.Column("middle_name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("suffix", sa.Text(), nullable=False),
        sa.Column("organization", sa.Text(), nullable=False),
        sa.Column("job_title", sa.Text(), nullable=False),
        sa.Column("emails", sa.JSON(), nullable=False),
        sa.Column("phones", sa.JSON(), nullable=False),
        sa.Column("addresses", sa.JSON(), nullable=False),
        sa.Column("birthday", sa.Date(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=320), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_contacts")),
        sa.UniqueConstraint("uid", name=op.f("uq_act_contacts_uid")),
    )
    with op.batch_alter_table("act_contacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_contacts_deleted_at"), ["deleted_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_contacts_owner"), ["owner"], unique=False)

    op.create_table(
        "act_tasks",
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("due", sa.String(length=40), nullable=True),
        sa.Column("start", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("percent_complete", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=320), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_tasks")),
        sa.UniqueConstraint("uid", name=op.f("uq_act_tasks_uid")),
    )
    with op.batch_alter_table("act_tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_tasks_deleted_at"), ["deleted_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_tasks_owner"), ["owner"], unique=False)

    op.create_table(
        "act_attendees",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("appointment_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("response", sa.String(length=20), nullable=False),
        sa.ForeignKeyConstraint(
            ["appointment_id"],
            ["act_appointments.id"],
            name=op.f("fk_act_attendees_appointment_id_act_appointments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_attendees")),
    )
    with op.batch_alter_table("act_attendees", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_attendees_address"), ["address"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_attendees_appointment_id"), ["appointment_id"], unique=False)

    op.create_table(
        "act_collections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("href", sa.String(length=1000), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("token", sa.Text(), nullable=True),
        sa.Column("filter_key", sa.String(length=200), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_act_collections_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_collections")),
        sa.UniqueConstraint("mailbox_id", "href", name="uq_act_collections_href"),
    )
    with op.batch_alter_table("act_collections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_collections_mailbox_id"), ["mailbox_id"], unique=False)

    op.create_table(
        "act_conflicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("ident", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("winner", sa.String(length=20), nullable=False),
        sa.Column("policy", sa.String(length=30), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_act_conflicts_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_conflicts")),
    )
    with op.batch_alter_table("act_conflicts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_conflicts_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_conflicts_mailbox_id"), ["mailbox_id"], unique=False)

    op.create_table(
        "act_filters",
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("appointments", sa.String(length=30), nullable=False),
        sa.Column("contacts", sa.String(length=30), nullable=False),
        sa.Column("tasks", sa.String(length=30), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_act_filters_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("mailbox_id", name=op.f("pk_act_filters")),
    )
    op.create_table(
        "act_quarantine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("href", sa.String(length=1000), nullable=False),
        sa.Column("etag", sa.String(length=200), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"], ["alerts.id"], name=op.f("fk_act_quarantine_alert_id_alerts"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["act_collections.id"],
            name=op.f("fk_act_quarantine_collection_id_act_collections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_quarantine")),
        sa.UniqueConstraint("collection_id", "href", name="uq_act_quarantine_href"),
    )
    with op.batch_alter_table("act_quarantine", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_quarantine_collection_id"), ["collection_id"], unique=False)

    op.create_table(
        "act_sync_status",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("ident", sa.String(length=255), nullable=False),
        sa.Column("href", sa.String(length=1000), nullable=True),
        sa.Column("etag", sa.String(length=200), nullable=True),
        sa.Column("app_hash", sa.String(length=64), nullable=True),
        sa.Column("server_hash", sa.String(length=64), nullable=True),
        sa.Column("app_state", sa.String(length=64), nullable=True),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["act_collections.id"],
            name=op.f("fk_act_sync_status_collection_id_act_collections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_act_sync_status")),
        sa.UniqueConstraint("collection_id", "href", name="uq_act_sync_status_href"),
        sa.UniqueConstraint("collection_id", "ident", name="uq_act_sync_status_ident"),
    )
    with op.batch_alter_table("act_sync_status", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_act_sync_status_collection_id"), ["collection_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_act_sync_status_ident"), ["ident"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("act_sync_status", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_sync_status_ident"))
        batch_op.drop_index(batch_op.f("ix_act_sync_status_collection_id"))

    op.drop_table("act_sync_status")
    with op.batch_alter_table("act_quarantine", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_quarantine_collection_id"))

    op.drop_table("act_quarantine")
    op.drop_table("act_filters")
    with op.batch_alter_table("act_conflicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_conflicts_mailbox_id"))
        batch_op.drop_index(batch_op.f("ix_act_conflicts_created_at"))

    op.drop_table("act_conflicts")
    with op.batch_alter_table("act_collections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_collections_mailbox_id"))

    op.drop_table("act_collections")
    with op.batch_alter_table("act_attendees", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_attendees_appointment_id"))
        batch_op.drop_index(batch_op.f("ix_act_attendees_address"))

    op.drop_table("act_attendees")
    with op.batch_alter_table("act_tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_tasks_owner"))
        batch_op.drop_index(batch_op.f("ix_act_tasks_deleted_at"))

    op.drop_table("act_tasks")
    with op.batch_alter_table("act_contacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_contacts_owner"))
        batch_op.drop_index(batch_op.f("ix_act_contacts_deleted_at"))

    op.drop_table("act_contacts")
    with op.batch_alter_table("act_appointments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_act_appointments_owner"))
        batch_op.drop_index(batch_op.f("ix_act_appointments_organizer"))
        batch_op.drop_index(batch_op.f("ix_act_appointments_deleted_at"))

    op.drop_table("act_appointments")
