"""blobs.location: blobs kept as files (store.blobfiles)

Revision ID: blobfiles
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "blobfiles"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: NULL = the bytes are in `content` (every row written before this revision)
    op.add_column("blobs", sa.Column("location", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("location")
