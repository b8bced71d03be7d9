"""Encryption at rest: the right key round-trips, a wrong key says so, key files stay private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from serversync.core.secret import Secret
from serversync.store import crypto
from serversync.store.crypto import Keyring, load_keyring, new_key


def test_round_trip_and_column_binding() -> None:
    ring = Keyring(new_key())
    sealed = ring.encrypt(Secret("pa55"), "profiles.service_secret")
    assert "pa55" not in sealed
    assert ring.decrypt(sealed, "profiles.service_secret") == Secret("pa55")
    with pytest.raises(crypto.KeyError_, match="integrity check"):
        ring.decrypt(sealed, "mailboxes.secret")  # copied into another column


def test_wrong_key_is_a_clear_error_not_garbage() -> None:
    sealed = Keyring(new_key()).encrypt(Secret("pa55"), "mailboxes.secret")
    other = Keyring(new_key(), source="/etc/serversync/key")
    with pytest.raises(crypto.KeyError_) as caught:
        other.decrypt(sealed, "mailboxes.secret")
    message = str(caught.value)
    assert "was encrypted with key" in message and other.primary_id in message
    assert "SERVERSYNC_SECRET_KEY" in caught.value.fix


def test_tampered_ciphertext_is_detected() -> None:
    ring = Keyring(new_key())
    sealed = ring.encrypt(Secret("pa55"), "c")
    head, payload = sealed.rsplit(":", 1)
    flipped = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB")
    with pytest.raises(crypto.KeyError_):
        ring.decrypt(f"{head}:{flipped}", "c")
    with pytest.raises(crypto.KeyError_, match="not an encrypted secret"):
        ring.decrypt("plain text", "c")


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "serversync.key"
    first = load_keyring(None, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(None, path).primary == first.primary
    os.chmod(path, 0o644)
    with pytest.raises(crypto.KeyError_, match="chmod 600"):
        load_keyring(None, path)


def test_environment_keys_and_rotation_keyring(tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    sealed = Keyring(old).encrypt(Secret("x"), "c")
    ring = load_keyring(f"{crypto.encode_key(new)},{crypto.encode_key(old)}", tmp_path / "unused")
    assert ring.primary == new and ring.decrypt(sealed, "c") == Secret("x")
    with pytest.raises(crypto.KeyError_, match="not 32"):
        load_keyring(crypto.encode_key(b"short"), tmp_path / "unused")
    path = tmp_path / "k"
    crypto.write_private(path, crypto.encode_key(old))
    crypto.install_rotated_key(path, new, old)
    assert load_keyring(None, path).others == [old]
    crypto.retire_old_keys(path)
    assert load_keyring(None, path) == Keyring(new, [], source=str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
