"""IMAP IDLE push (RFC 2177): tell the runtime within seconds that new mail arrived.

One long-lived connection per watched mailbox: log in exactly as the incoming sync does
(own credentials, impersonation or delegation, `core.rules.login_for`), select the folder
read-only (EXAMINE, so the ``\\Recent`` flag and the mailbox are never changed), and IDLE.
When the server announces ``EXISTS``, ``RECENT`` or ``EXPUNGE`` the watcher calls ``on_change`` — it does
not fetch anything itself: the incoming channel job reads the mail with its cursor, so push
can never lose or duplicate a message, only make the next sync come sooner. IDLE is
re-issued every ``refresh_s`` seconds (RFC 2177 asks for less than 29 minutes), which also
proves the connection is alive. Only one folder is watched (IDLE covers the selected folder);
the others are polled.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from serversync.connectors.imap import open_folder
from serversync.connectors.imapwire import ImapClient
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import PermanentError, TransientError
from serversync.core.model import Mailbox, Profile
from serversync.core.rules import Login

# EXPUNGE counts too: IDLE stops at the first event, and an EXISTS right behind it would
# otherwise only be seen by the next poll.
_NEW_MAIL = re.compile(rb"^\* \d+ (EXISTS|RECENT|EXPUNGE)\b", re.IGNORECASE)
_BYE = re.compile(rb"^\* BYE\b", re.IGNORECASE)


def watched_folder(mailbox: Mailbox) -> str:
    """INBOX when the mailbox syncs it (where new mail lands), else its first folder."""
    for folder in mailbox.folders:
        if folder.upper() == "INBOX":
            return folder
    return mailbox.folders[0] if mailbox.folders else "INBOX"


async def watch(profile: Profile, mailbox: Mailbox, login: Login, options: ConnectOptions, *,
                on_ready: Callable[[], Awaitable[None]],
                on_change: Callable[[], Awaitable[None]], refresh_s: float = 25 * 60) -> None:
    """Watch until cancelled or the connection fails (raises a typed `SyncError`)."""
    if profile.incoming is None:
        raise PermanentError(f"profile {profile.name} has no incoming server",
                             code="no-incoming")
    client = ImapClient(profile.incoming, options)
    try:
        await client.connect()
        await client.login(login)
        if "IDLE" not in client.capabilities:
            raise PermanentError(
                f"IMAP server {profile.incoming.host} does not support IDLE",
                fix="nothing to do: this mailbox is polled instead", code="idle-unavailable")
        await open_folder(client, login, options, watched_folder(mailbox), readonly=True)
        await on_ready()
        while True:
            events = await client.idle_once(refresh_s)
            if any(_BYE.match(e) for e in events):
                raise TransientError(f"IMAP server {profile.incoming.host} closed the IDLE "
                                     "session", code="idle-closed")
            if any(_NEW_MAIL.match(e) for e in events):
                await on_change()
    finally:
        await client.close()
