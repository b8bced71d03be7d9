"""Database engines and migrations.

The embedded default is a SQLite file in the current directory; PostgreSQL is the
production and scale-out database. Users give ordinary URLs (``sqlite:///serversync.db``,
``postgresql://user@host/db``); this module picks the async drivers (aiosqlite through
`store.sqlitehop`, psycopg 3)
and runs the Alembic migrations on start, so every command sees the current schema.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from serversync.core.errors import ConfigError
from serversync.store import sqlitehop
from serversync.store.crypto import Keyring
from serversync.store.repos import Repository

MIGRATIONS = Path(__file__).parent / "migrations"


def async_url(url: str) -> str:
    """Map a user's URL to the async driver SQLAlchemy needs."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL inside
        raise ConfigError("SERVERSYNC_DATABASE_URL", "is not a database URL",
                          fix="use sqlite:///path.db or postgresql://user@host/db") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername=f"sqlite+{sqlitehop.DRIVER}")  # aiosqlite, 1 hop
    elif backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    else:
        raise ConfigError("SERVERSYNC_DATABASE_URL", f"{backend} is not supported",
                          fix="use SQLite or PostgreSQL")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while a sync batch writes; foreign keys are off by default.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    engine = create_async_engine(async_url(url), **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "heads")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision of every branch (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


class Database:
    """The engine, the keyring and a way to run one transaction.

    ``async with db.transaction() as repo:`` yields a `Repository` bound to a session that
    commits when the block ends and rolls back if it raises, so a use case either writes
    everything or nothing.
    """

    def __init__(self, url: str, keyring: Keyring, **engine_args: Any) -> None:
        self.url = url
        self.keyring = keyring
        self.engine = create_engine(url, **engine_args)
        self.sessions = sessionmaker(self.engine)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Repository]:
        async with self.sessions() as session, session.begin():
            yield Repository(session, self.keyring)

    async def migrate(self) -> None:
        await migrate(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()
