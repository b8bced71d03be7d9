"""Shared fixtures: a migrated database on SQLite and on PostgreSQL, and the services.

``db`` is parametrized, so every test that takes it runs on both databases. PostgreSQL tests
get a fresh database cloned from a migrated template (``CREATE DATABASE … TEMPLATE``), which
costs a few tens of milliseconds instead of a full migration per test. Set
``SERVERSYNC_TEST_PG_URL`` to point elsewhere, or ``SERVERSYNC_SKIP_PG=1`` to skip them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from serversync import wiring
from serversync.services import Services
from serversync.store.crypto import Keyring, new_key
from serversync.store.db import Database

pytest_plugins = ["tests.testservers"]

PG_URL = os.environ.get("SERVERSYNC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEMPLATE = f"serversync_tmpl_{os.getpid()}"


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(PG_URL, autocommit=True)


def _pg_url(name: str) -> str:
    return PG_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database to clone; dropped at the end of the run."""
    if os.environ.get("SERVERSYNC_SKIP_PG") == "1":
        pytest.skip("SERVERSYNC_SKIP_PG=1")
    try:
        admin = _pg_admin()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        admin.execute(f'CREATE DATABASE "{TEMPLATE}"')

    async def build() -> None:
        database = Database(_pg_url(TEMPLATE), Keyring(new_key()))
        await database.migrate()
        await database.close()
    # Fixtures may be set up inside a running event loop: migrate on a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, build()).result()
    yield TEMPLATE
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(new_key())


async def _sqlite(tmp_path: object, keyring: Keyring) -> Database:
    database = Database(f"sqlite:///{tmp_path}/serversync.db", keyring)
    await database.migrate()
    return database


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: object,
             keyring: Keyring) -> AsyncIterator[Database]:
    """A fresh, migrated database: SQLite and PostgreSQL."""
    if request.param == "sqlite":
        database = await _sqlite(tmp_path, keyring)
        yield database
        await database.close()
        return
    template = request.getfixturevalue("pg_template")
    name = f"serversync_t_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    database = Database(_pg_url(name), keyring)
    try:
        yield database
    finally:
        await database.close()
        with _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def sqlite_db(tmp_path: object, keyring: Keyring) -> AsyncIterator[Database]:
    """SQLite only, for tests whose subject is not the database."""
    database = await _sqlite(tmp_path, keyring)
    yield database
    await database.close()


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS)
