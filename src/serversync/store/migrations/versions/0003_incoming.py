"""incoming email: item links, folder cursors, quarantine, loop guard

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incoming_loop_guard",
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("sender", name=op.f("pk_incoming_loop_guard")),
    )
    op.create_table(
        "incoming_cursors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("highest_modseq", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_incoming_cursors_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incoming_cursors")),
        sa.UniqueConstraint("mailbox_id", "folder", name="uq_incoming_cursors_folder"),
    )
    op.create_table(
        "incoming_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("remote_id", sa.String(length=255), nullable=False),
        sa.Column("email_id", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=12), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["email_id"], ["emails.id"], name=op.f("fk_incoming_links_email_id_emails"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_incoming_links_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["raw_sha256"], ["blobs.sha256"], name=op.f("fk_incoming_links_raw_sha256_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incoming_links")),
        sa.UniqueConstraint("mailbox_id", "folder", "remote_id", name="uq_incoming_links_item"),
    )
    op.create_index(op.f("ix_incoming_links_email_id"), "incoming_links", ["email_id"], unique=False)
    op.create_table(
        "incoming_quarantine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("remote_id", sa.String(length=255), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=50), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_incoming_quarantine_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["raw_sha256"], ["blobs.sha256"], name=op.f("fk_incoming_quarantine_raw_sha256_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incoming_quarantine")),
    )
    op.create_index(
        op.f("ix_incoming_quarantine_created_at"), "incoming_quarantine", ["created_at"], unique=False
    )
    op.create_index(
        op.f("ix_incoming_quarantine_mailbox_id"), "incoming_quarantine", ["mailbox_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_incoming_quarantine_mailbox_id"), table_name="incoming_quarantine")
    op.drop_index(op.f("ix_incoming_quarantine_created_at"), table_name="incoming_quarantine")
    op.drop_table("incoming_quarantine")
    op.drop_index(op.f("ix_incoming_links_email_id"), table_name="incoming_links")
    op.drop_table("incoming_links")
    op.drop_table("incoming_cursors")
    op.drop_table("incoming_loop_guard")
