"""outgoing email: the send lifecycle per email activity

Revision ID: 0004
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outgoing",
        sa.Column("email_id", sa.Integer(), nullable=False),
        sa.Column("mailbox", sa.String(length=320), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("send_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=12), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_code", sa.String(length=50), nullable=True),
        sa.Column("recipient_results", sa.JSON(), nullable=False),
        sa.Column("message_id", sa.String(length=998), nullable=False),
        sa.Column("date_header", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reply_to_email_id", sa.Integer(), nullable=True),
        sa.Column("save_to_sent", sa.Boolean(), nullable=False),
        sa.Column("sent_copy", sa.String(length=10), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("smtp_reply", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.ForeignKeyConstraint(["email_id"], ["emails.id"],
                                name=op.f("fk_outgoing_email_id_emails"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["reply_to_email_id"], ["emails.id"],
                                name=op.f("fk_outgoing_reply_to_email_id_emails"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("email_id", name=op.f("pk_outgoing")),
    )
    with op.batch_alter_table("outgoing", schema=None) as batch_op:
        batch_op.create_index("ix_outgoing_mailbox_due", ["mailbox", "due_at"], unique=False)
        batch_op.create_index("ix_outgoing_mailbox_phase", ["mailbox", "phase"], unique=False)
        batch_op.create_index(batch_op.f("ix_outgoing_message_id"), ["message_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outgoing", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outgoing_message_id"))
        batch_op.drop_index("ix_outgoing_mailbox_phase")
        batch_op.drop_index("ix_outgoing_mailbox_due")
    op.drop_table("outgoing")
