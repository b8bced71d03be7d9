"""store.blobfiles without a database: packs, locations, configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serversync.core.errors import ConfigError
from serversync.store import blobfiles
from serversync.store.blobfiles import BlobFiles


def items(*contents: bytes) -> list[tuple[str, bytes]]:
    return [(blobfiles.digest(c), c) for c in contents]


@pytest.mark.parametrize("policy", ["batch", "none"])
def test_pack_round_trip(tmp_path: Path, policy: str) -> None:
    files = BlobFiles(tmp_path / "blobs", policy)
    contents = [b"first", b"", b"\x00\xff" * 5000, "é".encode()]
    locations = files.write_many(items(*contents))
    assert [files.read(loc) for loc in locations] == contents
    packs = files.packs()
    assert len(packs) == 1 and packs[0][0].endswith(blobfiles.PACK_SUFFIX)  # one file a batch
    assert not list((tmp_path / "blobs").rglob("*" + blobfiles.TMP_SUFFIX))
    pack, offset, size = blobfiles.parse_location(locations[2])
    assert (pack, offset, size) == (packs[0][0], 5, 10000)
    assert files.write_many([]) == []


def test_each_batch_gets_its_own_pack(tmp_path: Path) -> None:
    files = BlobFiles(tmp_path, "none")
    first = files.write_many(items(b"a"))
    second = files.write_many(items(b"b"))
    assert blobfiles.parse_location(first[0])[0] != blobfiles.parse_location(second[0])[0]
    assert files.read(first[0]) == b"a" and files.read(second[0]) == b"b"


def test_truncated_pack_is_an_error_not_short_data(tmp_path: Path) -> None:
    files = BlobFiles(tmp_path, "none")
    [location] = files.write_many(items(b"0123456789"))
    pack = tmp_path / blobfiles.parse_location(location)[0]
    os.truncate(pack, 4)
    with pytest.raises(OSError, match="shorter"):
        files.read(location)


def test_where_blobs_go(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(blobfiles.DIR_ENV, raising=False)
    monkeypatch.delenv(blobfiles.FSYNC_ENV, raising=False)
    beside = blobfiles.for_url(f"sqlite:///{tmp_path}/x.db")
    assert beside == BlobFiles(tmp_path / "x.db.blobs", "batch")
    assert blobfiles.for_url("sqlite://") is None  # in memory: nowhere to put files
    assert blobfiles.for_url("postgresql://u@127.0.0.1/db") is None  # other hosts' workers
    monkeypatch.setenv(blobfiles.DIR_ENV, str(tmp_path / "shared"))
    monkeypatch.setenv(blobfiles.FSYNC_ENV, "none")
    assert blobfiles.for_url("postgresql://u@127.0.0.1/db") == BlobFiles(tmp_path / "shared",
                                                                          "none")
    monkeypatch.setenv(blobfiles.DIR_ENV, blobfiles.IN_DATABASE)
    assert blobfiles.for_url(f"sqlite:///{tmp_path}/x.db") is None
    monkeypatch.setenv(blobfiles.FSYNC_ENV, "sometimes")
    with pytest.raises(ConfigError, match=blobfiles.FSYNC_ENV):
        blobfiles.for_url(f"sqlite:///{tmp_path}/x.db")
