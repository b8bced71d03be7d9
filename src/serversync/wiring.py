"""The composition root: settings → database, keyring and connector registry.

The only module that imports concrete connectors. The CLI, the web app factory and the
tests import it; nothing else does.
"""

from __future__ import annotations

from serversync.config import Settings
from serversync.connectors import dav, imap, pop3, smtp
from serversync.core.model import Channel, ServerKind
from serversync.services import ProberRegistry, Services
from serversync.store.crypto import load_keyring
from serversync.store.db import Database

PROBERS: ProberRegistry = {
    (ServerKind.IMAP, Channel.INCOMING): imap.probe,
    (ServerKind.IMAP, Channel.OUTGOING): smtp.probe,
    (ServerKind.IMAP, Channel.ACT): dav.probe,
    (ServerKind.POP3, Channel.INCOMING): pop3.probe,
    (ServerKind.POP3, Channel.OUTGOING): smtp.probe,
}


def database(settings: Settings) -> Database:
    return Database(settings.database_url, load_keyring(settings.secret_keys, settings.key_file))


async def services(settings: Settings, *, migrate: bool = True) -> Services:
    db = database(settings)
    if migrate:
        await db.migrate()
    return Services(db, PROBERS)
