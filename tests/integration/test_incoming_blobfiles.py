"""Blobs in pack files (store.blobfiles) through the incoming store, on SQLite and PostgreSQL.

SQLite keeps its packs beside the database file by default; PostgreSQL keeps blobs in the
database unless ``SERVERSYNC_BLOB_DIR`` is set, so the PostgreSQL runs set it to exercise
the same file path (and one test checks the in-database default).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from serversync.core.email import Attachment, Direction, EmailActivity, EmailStatus
from serversync.store import blobfiles
from serversync.store.crypto import encode_key
from serversync.store.db import Database
from serversync.store.emails import BlobRow, EmailStore
from serversync.store.incoming import IncomingStore


@pytest.fixture
def blob_dir(db: Database, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The blob directory of ``db`` (set explicitly for PostgreSQL)."""
    monkeypatch.delenv(blobfiles.FSYNC_ENV, raising=False)
    if db.url.startswith("sqlite"):
        monkeypatch.delenv(blobfiles.DIR_ENV, raising=False)
        yield Path(db.url.split("///", 1)[1] + ".blobs")
    else:
        monkeypatch.setenv(blobfiles.DIR_ENV, str(tmp_path / "pg-blobs"))
        yield tmp_path / "pg-blobs"


async def rows(db: Database) -> list[tuple[str, int, bytes, str | None]]:
    async with db.transaction() as repo:
        found = await repo.session.execute(
            select(BlobRow.sha256, BlobRow.size, BlobRow.content, BlobRow.location)
            .order_by(BlobRow.sha256))
        return [tuple(r) for r in found.all()]  # type: ignore[misc]


def packs(root: Path) -> list[Path]:
    return sorted(root.rglob("*" + blobfiles.PACK_SUFFIX))


async def test_blobs_go_to_one_pack_per_batch_and_dedupe(db: Database, blob_dir: Path) -> None:
    raw = b"From: a@example.test\r\n\r\nhello" * 100
    async with db.transaction() as repo:
        store = IncomingStore(repo.session)
        digests = await store.put_blobs([(None, raw), (blobfiles.digest(b"x"), b"x"),
                                         (None, raw)])
    assert digests == [blobfiles.digest(raw), blobfiles.digest(b"x"), blobfiles.digest(raw)]
    assert len(packs(blob_dir)) == 1
    stored = await rows(db)
    assert len(stored) == 2  # the same content twice in a batch: one row, one copy
    assert all(content == b"" and location for _, _, content, location in stored)
    async with db.transaction() as repo:  # a later batch with the same content: nothing new
        again = await IncomingStore(repo.session).put_blobs([(None, raw)])
        assert await IncomingStore(repo.session).raw(again[0]) == raw
    assert len(packs(blob_dir)) == 1 and len(await rows(db)) == 2


async def test_attachments_and_raw_read_back_through_the_stores(db: Database,
                                                                 blob_dir: Path) -> None:
    content = os.urandom(50_000)
    activity = EmailActivity(Direction.INCOMING, EmailStatus.RECEIVED, "s", "a@example.test",
                             message_id="<m1@example.test>", content_hash="h1",
                             attachments=(Attachment("a.bin", "application/octet-stream",
                                                     len(content), content),
                                          Attachment("big.iso", "application/x-iso", 10**9,
                                                     None, notice="larger than the limit")))
    async with db.transaction() as repo:
        [email_id] = await IncomingStore(repo.session).add_activities([activity])
    async with db.transaction() as repo:
        got = await EmailStore(repo.session).get(email_id, with_content=True)
        many = await EmailStore(repo.session).get_many([email_id], with_content=True)
    assert got.attachments[0].content == content
    assert got.attachments[1].content is None and got.attachments[1].notice
    assert many[email_id].attachments[0].content == content
    assert packs(blob_dir)


async def test_inline_blobs_still_read(db: Database, blob_dir: Path) -> None:
    """Rows written before packs (content inline, no location) read as before."""
    async with db.transaction() as repo:
        digest = await EmailStore(repo.session).put_blob(b"old inline bytes")
    async with db.transaction() as repo:
        assert await EmailStore(repo.session).get_blob(digest) == b"old inline bytes"
        assert await IncomingStore(repo.session).raw(digest) == b"old inline bytes"


async def test_postgres_keeps_blobs_in_the_database_by_default(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    if db.url.startswith("sqlite"):
        monkeypatch.setenv(blobfiles.DIR_ENV, blobfiles.IN_DATABASE)  # the opt-out
    else:
        monkeypatch.delenv(blobfiles.DIR_ENV, raising=False)
    async with db.transaction() as repo:
        [digest] = await IncomingStore(repo.session).put_blobs([(None, b"inline")])
    assert await rows(db) == [(digest, 6, b"inline", None)]


CRASH = """
import asyncio, base64, os, sys
from serversync.store.crypto import Keyring
from serversync.store.db import Database
from serversync.store.incoming import IncomingStore
async def main():
    db = Database(sys.argv[1], Keyring(base64.urlsafe_b64decode(sys.argv[2])))
    async with db.transaction() as repo:
        await IncomingStore(repo.session).put_blobs([(None, b"raw one"), (None, b"raw two")])
        os._exit(86)  # the pack is written and flushed; the rows never commit
asyncio.run(main())
"""


async def test_crash_between_pack_write_and_commit(db: Database, blob_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, db.url,
                           encode_key(db.keyring.primary)], capture_output=True, timeout=60,
                          check=False, env=os.environ.copy())
    assert proc.returncode == 86, proc.stderr.decode()[-2000:]
    [orphan] = packs(blob_dir)  # written, but nothing points at it: no dangling reference
    assert await rows(db) == []
    # the replayed batch stores the same blobs again (a new pack) and commits the rows
    async with db.transaction() as repo:
        digests = await IncomingStore(repo.session).put_blobs([(None, b"raw one"),
                                                               (None, b"raw two")])
    assert len(packs(blob_dir)) == 2
    async with db.transaction() as repo:
        # a fresh orphan is left alone (its batch may still be committing) ...
        assert await blobfiles.sweep_orphans(repo.session) == 0
        # ... an old one is removed, the referenced pack kept
        assert await blobfiles.sweep_orphans(repo.session, older_than=0) == 1
    assert not orphan.exists() and len(packs(blob_dir)) == 1
    async with db.transaction() as repo:
        store = IncomingStore(repo.session)
        assert [await store.raw(d) for d in digests] == [b"raw one", b"raw two"]
        count = await repo.session.scalar(select(func.count()).select_from(BlobRow))
    assert count == 2


async def test_stale_temporary_pack_is_swept(db: Database, blob_dir: Path) -> None:
    (blob_dir / "2026-01").mkdir(parents=True)
    stale = blob_dir / "2026-01" / ("x.pack" + blobfiles.TMP_SUFFIX)
    stale.write_bytes(b"half a pack")
    async with db.transaction() as repo:
        assert await blobfiles.sweep_orphans(repo.session, older_than=0) == 1
    assert not stale.exists()


async def test_postgres_compresses_large_values_with_lz4(db: Database) -> None:
    if db.url.startswith("sqlite"):
        pytest.skip("TOAST compression is PostgreSQL's")
    async with db.transaction() as repo:
        lz4 = await repo.session.scalar(text(
            "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
            "AND 'lz4' = ANY(enumvals)"))
        methods = dict((await repo.session.execute(text(
            "SELECT c.relname || '.' || a.attname, a.attcompression FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid WHERE (c.relname, a.attname) IN "
            "(('blobs', 'content'), ('emails', 'body_text'), ('emails', 'body_html'))"))).all())
    if not lz4:
        pytest.skip("this PostgreSQL has no lz4")
    assert methods == {"blobs.content": "l", "emails.body_text": "l", "emails.body_html": "l"}


async def test_bulk_insert_round_trips_every_column(db: Database, blob_dir: Path) -> None:
    """The driver-level bulk paths (SQLite executemany, PostgreSQL COPY) store what the ORM
    reads back: JSON lists, aware datetimes, NULLs, non-ASCII, recipients, attachments."""
    import datetime as dt

    from serversync.core.email import CorrelationMethod, Recipient, Regarding, Role

    when = dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    activity = EmailActivity(
        Direction.INCOMING, EmailStatus.RECEIVED, "Grüße \t ünd 'quotes' \\ back", "a@ex.test",
        recipients=(Recipient(Role.FROM, "a@ex.test", "Ä"),
                    Recipient(Role.TO, "b@ex.test", "", "user", "bob")),
        message_id="<m2@ex.test>", in_reply_to="<m0@ex.test>",
        references=("<m0@ex.test>", "<m1@ex.test>"), conversation_id="conv",
        tracking_token="CRM:0001", sent_at=when, received_at=when, body_text="line\nnext",
        body_html="<p>x</p>", attachments=(Attachment("f.txt", "text/plain", 2, b"hi", "cid"),),
        owner_kind="user", owner="bob", regarding=Regarding("account", "acme"),
        correlation=CorrelationMethod.NONE, content_hash="h2", notices=("n1", "n2"),
        created_at=when)
    async with db.transaction() as repo:
        first, second = await IncomingStore(repo.session).add_activities(
            [activity, dataclasses.replace(activity, message_id=None, references=(),
                                           notices=(), sent_at=None, regarding=None,
                                           attachments=(), recipients=())])
    async with db.transaction() as repo:
        got = await EmailStore(repo.session).get(first, with_content=True)
        other = await EmailStore(repo.session).get(second)
    assert dataclasses.replace(got, id=None) == activity
    assert other.message_id is None and other.references == () and other.sent_at is None
    assert second != first


def test_cli_sweeps_orphan_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from serversync.cli import app

    monkeypatch.setenv("SERVERSYNC_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("SERVERSYNC_KEY_FILE", str(tmp_path / "cli.key"))
    monkeypatch.delenv("SERVERSYNC_SECRET_KEY", raising=False)
    monkeypatch.delenv(blobfiles.DIR_ENV, raising=False)
    [location] = blobfiles.BlobFiles(tmp_path / "cli.db.blobs").write_many(
        [(blobfiles.digest(b"lost"), b"lost")])  # a pack of a batch that never committed
    runner = CliRunner()
    fresh = runner.invoke(app, ["sweep-blobs"])
    assert fresh.exit_code == 0 and "removed 0" in fresh.stdout  # within the grace period
    old = runner.invoke(app, ["sweep-blobs", "--older-than", "0"])
    assert old.exit_code == 0 and "removed 1" in old.stdout, old.stdout
    assert not (tmp_path / "cli.db.blobs" / blobfiles.parse_location(location)[0]).exists()
