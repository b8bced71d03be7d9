"""One settings object, read from the environment once, at the entry point.

| variable | default | meaning |
|---|---|---|
| ``SERVERSYNC_DATABASE_URL`` | ``sqlite:///serversync.db`` | SQLite file or PostgreSQL URL |
| ``SERVERSYNC_SECRET_KEY`` | — | url-safe base64 AES-256 key(s), comma-separated, first encrypts |
| ``SERVERSYNC_KEY_FILE`` | ``serversync.key`` | key file used when no key is in the environment |
| ``SERVERSYNC_DEBUG`` | off | print tracebacks of unexpected errors |
| ``SERVERSYNC_BLOB_DIR`` | ``<sqlite file>.blobs`` | blob packs (`store.blobfiles`) |
| ``SERVERSYNC_BLOB_FSYNC`` | ``batch`` | flush packs before commit; ``none`` |
| ``SERVERSYNC_GRAPH_NOTIFICATION_URL`` | — | public URL of ``/graph/notify``: Graph push; unset: poll |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATABASE_URL = "sqlite:///serversync.db"
DEFAULT_KEY_FILE = Path("serversync.key")


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    key_file: Path = DEFAULT_KEY_FILE
    secret_keys: str | None = None
    debug: bool = False
    graph_notification_url: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        return cls(
            database_url=env.get("SERVERSYNC_DATABASE_URL") or DEFAULT_DATABASE_URL,
            key_file=Path(env.get("SERVERSYNC_KEY_FILE") or DEFAULT_KEY_FILE),
            secret_keys=env.get("SERVERSYNC_SECRET_KEY") or None,
            debug=env.get("SERVERSYNC_DEBUG", "") not in ("", "0"),
            graph_notification_url=env.get("SERVERSYNC_GRAPH_NOTIFICATION_URL") or None)

    def __repr__(self) -> str:
        # The URL may carry a database password and the keys are secrets: never print them.
        return f"Settings(key_file={str(self.key_file)!r})"
