"""incoming_quarantine: what an administrator did with a quarantined message, and when

Revision ID: 0013
Revises: 0003

Until this revision a quarantined message could only be kept. `services.quarantine` lets an
administrator retry or discard it; these columns record that on the row itself (there is no
separate audit table): ``retries`` and ``retried_at`` count the attempts, ``released_at`` /
``released_by`` / ``outcome`` say when, by whom and how it left the quarantine (tracked,
linked, skipped or discarded). ``sent`` and ``internal_date`` keep what a retry needs to
process the message exactly like the incoming job would (the Sent folder makes outgoing
activities; the server's arrival date becomes the activity's received date). Rows written
before this revision have them NULL: a retry then infers them (`services.quarantine`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incoming_quarantine") as batch:
        batch.add_column(sa.Column("sent", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("internal_date", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("released_by", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("outcome", sa.String(length=12), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("incoming_quarantine") as batch:
        for column in ("outcome", "released_by", "retried_at", "retries", "internal_date",
                       "sent"):
            batch.drop_column(column)
