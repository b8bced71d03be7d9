"""sign_ins: device-code sign-ins of Exchange Online mailboxes, readable by every worker

One row per mailbox (the latest attempt), removed with the mailbox. ``device_code`` is
`store.crypto` ciphertext (``tables.SECRET_COLUMNS``) and is cleared when the attempt ends;
no token is ever stored here (the refresh token is the mailbox's own encrypted secret).

Revision ID: 0015
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sign_ins",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("user_code", sa.String(length=64), nullable=False),
        sa.Column("verification_uri", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("device_code", sa.Text(), nullable=True),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("started_by", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("polled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("signed_in_as", sa.String(length=320), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("error_fix", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["mailbox_id"], ["mailboxes.id"],
                                name=op.f("fk_sign_ins_mailbox_id_mailboxes"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_ins")),
        sa.UniqueConstraint("mailbox_id", name=op.f("uq_sign_ins_mailbox_id")),
    )


def downgrade() -> None:
    op.drop_table("sign_ins")
