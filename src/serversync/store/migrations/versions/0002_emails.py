"""email activities

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "emails",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=10), nullable=False),
        sa.Column("status", sa.String(length=15), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("message_id", sa.String(length=998), nullable=True),
        sa.Column("in_reply_to", sa.Text(), nullable=True),
        sa.Column("references", sa.JSON(), nullable=False),
        sa.Column("conversation_id", sa.String(length=255), nullable=True),
        sa.Column("tracking_token", sa.String(length=50), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("body_text", sa.Text(), nullable=False),
        sa.Column("body_html", sa.Text(), nullable=False),
        sa.Column("owner_kind", sa.String(length=10), nullable=True),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("regarding_kind", sa.String(length=50), nullable=True),
        sa.Column("regarding_key", sa.String(length=255), nullable=True),
        sa.Column("correlated_to", sa.Integer(), nullable=True),
        sa.Column("correlation", sa.String(length=20), nullable=False),
        sa.Column("sender_mailbox", sa.String(length=320), nullable=True),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("notices", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["correlated_to"], ["emails.id"], name=op.f("fk_emails_correlated_to_emails"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_emails")),
    )
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_emails_content_hash"), ["content_hash"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_conversation_id"), ["conversation_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_direction"), ["direction"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_message_id"), ["message_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_sender"), ["sender"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_sender_mailbox"), ["sender_mailbox"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_tracking_token"), ["tracking_token"], unique=False)

    op.create_table(
        "email_attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content_id", sa.String(length=998), nullable=True),
        sa.Column("blob_sha256", sa.String(length=64), nullable=True),
        sa.Column("notice", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_sha256"], ["blobs.sha256"], name=op.f("fk_email_attachments_blob_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["email_id"], ["emails.id"], name=op.f("fk_email_attachments_email_id_emails"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_attachments")),
    )
    with op.batch_alter_table("email_attachments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_email_attachments_email_id"), ["email_id"], unique=False)

    op.create_table(
        "email_recipients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("party_kind", sa.String(length=10), nullable=True),
        sa.Column("party_key", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["email_id"], ["emails.id"], name=op.f("fk_email_recipients_email_id_emails"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_recipients")),
    )
    with op.batch_alter_table("email_recipients", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_email_recipients_address"), ["address"], unique=False)
        batch_op.create_index(batch_op.f("ix_email_recipients_email_id"), ["email_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("email_recipients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_email_recipients_email_id"))
        batch_op.drop_index(batch_op.f("ix_email_recipients_address"))

    op.drop_table("email_recipients")
    with op.batch_alter_table("email_attachments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_email_attachments_email_id"))

    op.drop_table("email_attachments")
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_emails_tracking_token"))
        batch_op.drop_index(batch_op.f("ix_emails_status"))
        batch_op.drop_index(batch_op.f("ix_emails_sender_mailbox"))
        batch_op.drop_index(batch_op.f("ix_emails_sender"))
        batch_op.drop_index(batch_op.f("ix_emails_message_id"))
        batch_op.drop_index(batch_op.f("ix_emails_direction"))
        batch_op.drop_index(batch_op.f("ix_emails_created_at"))
        batch_op.drop_index(batch_op.f("ix_emails_conversation_id"))
        batch_op.drop_index(batch_op.f("ix_emails_content_hash"))

    op.drop_table("emails")
    op.drop_table("blobs")
