"""blobs.location (blobs kept in pack files, store.blobfiles); lz4 for large PostgreSQL values

Revision ID: blobfiles
Revises: 0002

On PostgreSQL the large values (blob contents, bodies) are TOAST-compressed with pglz by
default, which was the bottleneck of an initial sync there (476 msg/s; with lz4 1,489 msg/s,
docs/benchmarks.md): lz4 is set on those columns when the server supports it (PostgreSQL 14+
built with lz4); otherwise they stay as they are.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "blobfiles"
down_revision = "0002"
branch_labels = None
depends_on = None

LZ4_COLUMNS = (("blobs", "content"), ("emails", "body_text"), ("emails", "body_html"))


def _has_lz4() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    return bool(bind.execute(sa.text(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
        "AND 'lz4' = ANY(enumvals)")).scalar())


def upgrade() -> None:
    # nullable: NULL = the bytes are in `content` (every row written before this revision)
    op.add_column("blobs", sa.Column("location", sa.String(length=80), nullable=True))
    if _has_lz4():
        for table, column in LZ4_COLUMNS:
            op.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET COMPRESSION lz4')


def downgrade() -> None:
    if _has_lz4():
        for table, column in LZ4_COLUMNS:
            op.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET COMPRESSION pglz')
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("location")
