"""SQLite through aiosqlite with one thread hop per statement instead of four.

aiosqlite runs each SQLite connection in its own thread; every call crosses to it and back
(a queue put, a GIL hand-over, a ``call_soon_threadsafe`` wake of the event loop).
SQLAlchemy's aiosqlite adapter makes four such calls per statement — create a cursor,
execute, fetch all rows, close the cursor — which cost ~0.1 ms of CPU each: on a
no-change poll of 1,000 mailboxes (~12 statements a run) the hops alone were a third of
the cycle (docs/benchmarks.md, "Scale"). This dialect does the same four steps in *one*
call on the connection's thread and hands back the rows; SQL, transactions, locking and
types are unchanged (it is SQLAlchemy's aiosqlite dialect with another cursor class).

The sqlite3 cursor is left unclosed: its statement has run to completion (DML) or was
read to the end (``fetchall``), so it holds no lock, and closing it would be one more hop.
Server-side (streaming) cursors keep SQLAlchemy's own class.

`store.db.async_url` maps ``sqlite:///...`` URLs to this driver (``sqlite+aiosqlite1hop``).
"""

from __future__ import annotations

import collections
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.util.concurrency import await_

DRIVER = "aiosqlite1hop"


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """A cursor whose execute is a single call on the connection's thread."""

    __slots__ = ()

    def _make_new_cursor(self, connection: Any) -> Any:
        return None  # made on the connection's thread, by the first execute

    def _aenter_cursor(self, cursor: Any) -> Any:
        return cursor

    @property
    def description(self) -> Any:
        if "description" in self._soft_closed_memoized:
            return self._soft_closed_memoized["description"]
        return None if self._cursor is None else self._cursor.description

    @property
    def rowcount(self) -> int:
        return -1 if self._cursor is None else int(self._cursor.rowcount)

    @property
    def lastrowid(self) -> int:
        return 0 if self._cursor is None else int(self._cursor.lastrowid or 0)

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        connection = self._connection  # the aiosqlite.Connection

        def execute() -> tuple[Any, list[Any] | None]:
            raw = connection._conn.cursor()
            if parameters is None:
                raw.execute(operation)
            else:
                raw.execute(operation, parameters)
            return raw, (raw.fetchall() if raw.description else None)

        async with self._adapt_connection._execute_mutex:
            raw, rows = await connection._execute(execute)
        self._cursor = raw
        if rows is not None:
            self._rows = collections.deque(rows)
        return raw

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        connection = self._connection

        def executemany() -> Any:
            raw = connection._conn.cursor()
            raw.executemany(operation, seq_of_parameters)
            return raw

        async with self._adapt_connection._execute_mutex:
            self._cursor = await connection._execute(executemany)
        return self._cursor

    async def _async_soft_close(self) -> None:
        self._soft_closed_memoized = self._soft_closed_memoized.union(
            {"description": self.description})

    def close(self) -> None:
        self._rows.clear()

    def nextset(self) -> None:
        return None

    def setinputsizes(self, *inputsizes: Any) -> None:
        return None


class OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneHopCursor


class OneHopDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> OneHopConnection:
        connection = self.aiosqlite.connect(*arg, **kw)
        connection._thread.daemon = True  # as SQLAlchemy's: never hold up interpreter exit
        return OneHopConnection(self, await_(connection))


class OneHopDialect(SQLiteDialect_aiosqlite):
    driver = DRIVER
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> OneHopDBAPI:
        return OneHopDBAPI(__import__("aiosqlite"), __import__("sqlite3"))


registry.register(f"sqlite.{DRIVER}", __name__, "OneHopDialect")
