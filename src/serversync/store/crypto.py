"""Encryption of secrets at rest (AES-256-GCM from `cryptography`).

Every password, client secret and token is stored as ``v1:<key id>:<base64 nonce+ciphertext>``.
The key id (the first 8 hex digits of SHA-256 of the key) names the key that sealed the value,
so a wrong or missing key is reported as exactly that — never as garbage — and a rotation can
run with both keys loaded. The column name is bound in as associated data, so a ciphertext
copied into another column does not decrypt.

Keys come from ``SERVERSYNC_SECRET_KEY`` (one or more comma-separated url-safe base64 keys,
the first encrypts) or from a key file, created on first use with mode 0600. Key material is
never logged or printed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serversync.core.errors import PermanentError
from serversync.core.secret import Secret

PREFIX = "v1"
KEY_BYTES = 32


class KeyError_(PermanentError):
    code = "secret-key"


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_key(text: str, source: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode())
    except ValueError as exc:
        raise KeyError_(f"the secret key in {source} is not url-safe base64",
                        fix="generate one with: serversync generate-key FILE") from exc
    if len(key) != KEY_BYTES:
        raise KeyError_(f"the secret key in {source} is {len(key)} bytes, not {KEY_BYTES}",
                        fix="generate one with: serversync generate-key FILE")
    return key


@dataclass
class Keyring:
    """The encryption key and any older keys still needed to read old values."""

    primary: bytes
    others: list[bytes] = field(default_factory=list)
    source: str = "memory"

    @property
    def primary_id(self) -> str:
        return key_id(self.primary)

    def _keys(self) -> dict[str, bytes]:
        return {key_id(k): k for k in [self.primary, *self.others]}

    def encrypt(self, secret: Secret, column: str) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self.primary).encrypt(nonce, secret.reveal().encode(), column.encode())
        return f"{PREFIX}:{self.primary_id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, stored: str, column: str) -> Secret:
        try:
            prefix, kid, payload = stored.split(":", 2)
            blob = base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise KeyError_(f"the stored value of {column} is not an encrypted secret",
                            fix="set the secret again") from exc
        if prefix != PREFIX:
            raise KeyError_(f"the stored value of {column} uses unknown format {prefix!r}")
        key = self._keys().get(kid)
        if key is None:
            raise KeyError_(
                f"{column} was encrypted with key {kid}, but the configured key is "
                f"{self.primary_id} ({self.source})",
                fix="set SERVERSYNC_SECRET_KEY or SERVERSYNC_KEY_FILE to the key this database "
                    "was encrypted with (or restore the key file)")
        try:
            plain = AESGCM(key).decrypt(blob[:12], blob[12:], column.encode())
        except InvalidTag as exc:
            raise KeyError_(f"the stored value of {column} failed its integrity check with key "
                            f"{kid}: it was altered or copied from another field",
                            fix="set the secret again") from exc
        return Secret(plain.decode())


def write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


def load_keyring(env_keys: str | None, key_file: Path) -> Keyring:
    """Keys from the environment if set, else from ``key_file`` (created on first use)."""
    if env_keys:
        keys = [decode_key(k, "SERVERSYNC_SECRET_KEY") for k in env_keys.split(",") if k.strip()]
        return Keyring(keys[0], keys[1:], source="SERVERSYNC_SECRET_KEY")
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_private(key_file, encode_key(new_key()))
        except FileExistsError:
            pass  # another process created it first; read theirs
    mode = key_file.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyError_(f"key file {key_file} is readable by other users (mode {mode:o})",
                        fix=f"chmod 600 {key_file}")
    lines = [ln for ln in key_file.read_text().splitlines() if ln.strip()]
    if not lines:
        raise KeyError_(f"key file {key_file} is empty", fix="restore it from a backup")
    keys = [decode_key(ln, str(key_file)) for ln in lines]
    return Keyring(keys[0], keys[1:], source=str(key_file))


def install_rotated_key(key_file: Path, new: bytes, old: bytes) -> None:
    """Make ``new`` the key file's primary key, keeping ``old`` on the next line.

    Written to a temporary 0600 file and renamed over the old one, so a crash leaves either
    the old file or the new one, and both decrypt a database in either state.
    """
    tmp = key_file.with_name(key_file.name + ".new")
    tmp.unlink(missing_ok=True)
    write_private(tmp, f"{encode_key(new)}\n{encode_key(old)}")
    os.replace(tmp, key_file)


def retire_old_keys(key_file: Path) -> None:
    """Drop every key but the primary once nothing is encrypted with them."""
    lines = [ln for ln in key_file.read_text().splitlines() if ln.strip()]
    tmp = key_file.with_name(key_file.name + ".new")
    tmp.unlink(missing_ok=True)
    write_private(tmp, lines[0])
    os.replace(tmp, key_file)
