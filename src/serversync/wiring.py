"""The composition root: settings → database, keyring and connector registry.

The only module that imports concrete connectors. The CLI, the web app factory and the
tests import it; nothing else does.
"""

from __future__ import annotations

from typing import Any

from serversync.config import Settings
from serversync.connectors import (
    alertmail,
    dav,
    ews,
    ews_items,
    gmail,
    graph,
    graph_items,
    imap,
    imappush,
    pop3,
    smtp,
)
from serversync.connectors.imapsessions import SessionCache
from serversync.core.model import Alert, Channel, Profile, ServerKind
from serversync.services import ProberRegistry, Services, connect_options
from serversync.services.act import ActJob, StoreFactory
from serversync.services.incoming import IncomingJob, SourceFactory
from serversync.services.outgoing import OutgoingService
from serversync.store.crypto import load_keyring
from serversync.store.db import Database

PROBERS: ProberRegistry = {
    (ServerKind.IMAP, Channel.INCOMING): imap.probe,
    (ServerKind.IMAP, Channel.OUTGOING): smtp.probe,
    (ServerKind.IMAP, Channel.ACT): dav.probe,
    (ServerKind.POP3, Channel.INCOMING): pop3.probe,
    (ServerKind.POP3, Channel.OUTGOING): smtp.probe,
    (ServerKind.EXCHANGE, Channel.INCOMING): ews.probe,
    (ServerKind.EXCHANGE, Channel.OUTGOING): ews.probe,
    (ServerKind.EXCHANGE, Channel.ACT): ews.probe,
    (ServerKind.EXCHANGE_ONLINE, Channel.INCOMING): graph.probe,
    (ServerKind.EXCHANGE_ONLINE, Channel.OUTGOING): graph.probe,
    (ServerKind.EXCHANGE_ONLINE, Channel.ACT): graph.probe,
    (ServerKind.GMAIL, Channel.INCOMING): gmail.probe,
    (ServerKind.GMAIL, Channel.OUTGOING): gmail.probe,
}

# Incoming mail sources per server kind (services.incoming).
INCOMING_SOURCES: dict[ServerKind, SourceFactory] = {ServerKind.IMAP: imap.source,
                                                     ServerKind.POP3: pop3.source}
INCOMING_SOURCES.update({ServerKind.EXCHANGE: ews.source, ServerKind.EXCHANGE_ONLINE: graph.source,
                         ServerKind.GMAIL: gmail.source})

# Appointment, contact and task stores per server kind (services.act).
ACT_STORES: dict[ServerKind, StoreFactory] = {ServerKind.IMAP: dav.store}
ACT_STORES[ServerKind.EXCHANGE_ONLINE] = graph_items.store
ACT_STORES[ServerKind.EXCHANGE] = ews_items.store

# Push watchers per server kind (runtime.push); other kinds are polled.
PUSHERS = {ServerKind.IMAP: imappush.watch}


async def mail_alert(profile: Profile, alert: Alert) -> None:
    """Email a profile-level alert to the profile's owner (services.runs.ChannelRunner)."""
    await alertmail.send(profile, alert, connect_options(profile))


def database(settings: Settings, **engine_args: Any) -> Database:
    return Database(settings.database_url, load_keyring(settings.secret_keys, settings.key_file),
                    **engine_args)


async def services(settings: Settings, *, migrate: bool = True, keep_sessions: bool = False,
                   **engine_args: Any) -> Services:
    """Everything wired. ``keep_sessions``: long-running processes (``serve``, ``worker``)
    keep IMAP sessions logged in between runs (`connectors.imapsessions`); ``engine_args``
    go to SQLAlchemy (a worker sizes its pool to its concurrency)."""
    db = database(settings, **engine_args)
    if migrate:
        await db.migrate()
    sessions: SessionCache[Any] | None = SessionCache() if keep_sessions else None
    incoming = IncomingJob(db, INCOMING_SOURCES, sessions=sessions)
    return Services(db, PROBERS, jobs={Channel.INCOMING: incoming,
                                         Channel.OUTGOING: OutgoingService(db),
                                         Channel.ACT: ActJob(db, ACT_STORES)})
