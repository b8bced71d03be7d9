"""Content-addressed blobs in pack files: raw messages and attachments outside the database.

Why: an initial sync writes every raw message (kept for audit) and every attachment. In a
SQLite file those bytes go through the single writer connection three times (WAL write,
WAL read and database write at the checkpoint) and made up two thirds of the file; moved
out, the SQLite thread's CPU per 10,000 messages fell from ~1.9 to ~0.8 s and the file from
465 to ~140 MB (docs/benchmarks.md, incoming).

Addressing stays content-based: a blob is known by its SHA-256 (the ``blobs`` row, unique,
so the same attachment or the same raw message is stored once). The bytes live in *packs*:
each batch's new blobs are appended to one file ``<root>/<yyyy-mm>/<time>-<random>.pack``,
and the row keeps the hash, the size and the location ``<yyyy-mm>/<name>#<offset>+<size>``
with an empty ``content``. A row whose ``location`` is NULL holds its bytes inline (rows
written before this module, PostgreSQL by default, `EmailStore.put_blob`). One file per
batch rather than one per blob: durability then costs one ``fdatasync`` per batch instead
of one per blob (measured: per-file fsync added ~0.1 ms of CPU per blob, more than the
whole database insert).

Where (``SERVERSYNC_BLOB_DIR``):

* unset: a SQLite file database ``/path/x.db`` keeps its blobs in ``/path/x.db.blobs/``
  (back the two up together); PostgreSQL and in-memory SQLite keep them in the database (a
  worker on another host could not read a local directory);
* a path: that directory, for any database (every process that reads or writes blobs must
  see it, e.g. a shared volume);
* ``database``: always in the database.

Flushing (``SERVERSYNC_BLOB_FSYNC``): a pack is written under a temporary name, then

* ``batch`` (default): ``fdatasync`` of the pack, rename, ``fsync`` of its directory —
  all before the transaction that inserts its rows commits, so a committed row never
  points at bytes a power failure could lose;
* ``none``: rename only, flushing left to the OS (throwaway databases, benchmarks of the
  rest).

Crash safety: a pack is complete and renamed into place before its rows are inserted, and
its rows commit in one transaction or not at all. A crash in between leaves a pack nothing
points at (an orphan); the replayed batch writes its blobs again into a new pack and
commits the rows, so nothing is lost and nothing dangles. `sweep_orphans` (CLI:
``serversync sweep-blobs``) deletes orphan packs and stale temporary files older than a
grace period. Deleting single blobs (which
would need pack compaction) is not supported; nothing deletes blobs today.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncSession

from serversync.core.errors import ConfigError

DIR_ENV = "SERVERSYNC_BLOB_DIR"
FSYNC_ENV = "SERVERSYNC_BLOB_FSYNC"
FSYNC_POLICIES = ("batch", "file", "none")
IN_DATABASE = "database"
TMP_SUFFIX = ".tmp"
PACK_SUFFIX = ".pack"


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def parse_location(location: str) -> tuple[str, int, int]:
    """``"<pack path>#<offset>+<size>"`` → (pack path, offset, size)."""
    pack, _, span = location.rpartition("#")
    offset, _, size = span.partition("+")
    return pack, int(offset), int(size)


@dataclass(frozen=True)
class BlobFiles:
    """One blob directory and its flush policy; every method is blocking (run in a thread)."""

    root: Path
    fsync: str = "batch"

    def write_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append the contents to one new pack; return each one's location, in order.

        The pack is written under a temporary name, flushed (policy), and renamed into
        place; only then may rows point at it. One pack per call (one per batch) keeps the
        flush to one ``fdatasync`` plus one directory ``fsync``.
        """
        if not items:
            return []
        now = time.gmtime()
        folder = f"{now.tm_year:04d}-{now.tm_mon:02d}"
        name = f"{time.strftime('%Y%m%dT%H%M%S', now)}-{uuid.uuid4().hex[:16]}{PACK_SUFFIX}"
        directory = self.root / folder
        created = not directory.is_dir()
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (name + TMP_SUFFIX)
        locations: list[str] = []
        offset = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for _sha256, content in items:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                locations.append(f"{folder}/{name}#{offset}+{len(content)}")
                offset += len(content)
            if self.fsync != "none":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
        if self.fsync != "none":
            _fsync_dir(directory)
            if created:
                _fsync_dir(self.root)
        return locations

    def read(self, location: str) -> bytes:
        pack, offset, size = parse_location(location)
        with open(self.root / pack, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"blob pack {pack} is shorter than its rows say ({location})")
        return data

    def packs(self) -> list[tuple[str, float]]:
        """(relative path, mtime) of every pack and leftover temporary file."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob("*/*"):
            if path.name.endswith((PACK_SUFFIX, TMP_SUFFIX)):
                try:
                    found.append((f"{path.parent.name}/{path.name}", path.stat().st_mtime))
                except FileNotFoundError:
                    continue
        return found


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _configured(url: str, directory: str, fsync: str) -> BlobFiles | None:
    if fsync not in FSYNC_POLICIES:
        raise ConfigError(FSYNC_ENV, f"is {fsync!r}",
                          fix=f"use one of {', '.join(FSYNC_POLICIES)}")
    if directory == IN_DATABASE:
        return None
    if directory:
        return BlobFiles(Path(directory), fsync)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return BlobFiles(Path(parsed.database + ".blobs").absolute(), fsync)


def for_url(url: str) -> BlobFiles | None:
    """The blob directory of a database URL (None: blobs stay in the database)."""
    return _configured(url, os.environ.get(DIR_ENV, ""),
                       os.environ.get(FSYNC_ENV, "") or "batch")


def for_session(session: AsyncSession) -> BlobFiles | None:
    bind = session.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    return for_url(engine.url.render_as_string(hide_password=True))


async def read(session: AsyncSession, location: str) -> bytes:
    files = for_session(session)
    if files is None:
        raise ConfigError(DIR_ENV, f"is not set, but blob {location} is stored in a file",
                          fix="set it to the blob directory this database was written with")
    return await asyncio.to_thread(files.read, location)


async def sweep_orphans(session: AsyncSession, *, older_than: float = 3600.0) -> int:
    """Delete packs that no ``blobs`` row points into, and stale temporary files.

    Every pack belongs to one transaction: its rows commit together or not at all, so a
    pack is either referenced or an orphan of a crashed batch. Only files older than
    ``older_than`` seconds are considered, so the pack of a batch whose transaction has not
    committed yet is never taken. Returns how many files were removed.
    """
    from serversync.store.emails import BlobRow  # emails imports this module

    files = for_session(session)
    if files is None:
        return 0
    cutoff = time.time() - older_than
    old = [name for name, mtime in await asyncio.to_thread(files.packs) if mtime < cutoff]
    if not old:
        return 0
    used: set[str] = set()
    result = await session.stream_scalars(
        select(BlobRow.location).where(BlobRow.location.is_not(None)))
    async for location in result:
        if location:
            used.add(location.rpartition("#")[0])
    doomed = [files.root / name for name in old if name not in used]

    def unlink() -> None:
        for path in doomed:
            path.unlink(missing_ok=True)

    await asyncio.to_thread(unlink)
    return len(doomed)
