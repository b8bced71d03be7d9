"""act_tasks.rrule: recurring tasks (CalDAV VTODO RRULE, EWS task recurrence, To Do)

Revision ID: 0011
Revises: 0005

Before this column a recurring task's RRULE was dropped when read from CalDAV; existing rows
are one-off tasks, so they get the empty rule (and keep their content hash: `core.act`
leaves an empty task rule out of the hash).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("act_tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rrule", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("act_tasks", schema=None) as batch_op:
        batch_op.drop_column("rrule")
