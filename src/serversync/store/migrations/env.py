"""Alembic environment: runs on the connection handed over by `store.db.migrate`."""

from __future__ import annotations

from alembic import context

import serversync.store.schema  # noqa: F401  (registers every table module on Base)
from serversync.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic` on the command line gets here
    raise SystemExit("run migrations through `serversync migrate`")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
