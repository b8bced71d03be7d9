"""IMAP mailboxes: reaching a user's folders with each access mode.

Own credentials and impersonation open the user's own namespace; delegation logs in as the
delegate and opens the user's folders through the shared namespace (RFC 4314 ACLs, e.g.
Dovecot's ``shared/<user>/``), for email only.
"""

from __future__ import annotations

from serversync.connectors.imapwire import ImapClient, ImapNo
from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import ProbeResult
from serversync.core.errors import PermanentError
from serversync.core.model import AccessMode, Channel, Mailbox, Profile
from serversync.core.rules import Login


def shared_folder(options: ConnectOptions, user: str, folder: str) -> list[str]:
    """Candidate names of ``folder`` of ``user`` in the shared namespace, best first.

    QUIRK(dovecot): a Maildir++ user's INBOX is the namespace root itself
    (``shared/bob@example.test``), and also answers to ``.../INBOX``.
    """
    prefix = options.shared_namespace.format(user=user)
    names = [prefix + folder]
    if folder.upper() == "INBOX":
        names.append(prefix.rstrip("/"))
    return names


async def open_folder(client: ImapClient, login: Login, options: ConnectOptions,
                      folder: str, *, readonly: bool = True) -> str:
    """Select ``folder`` of the login's target mailbox; return the name that worked."""
    if login.mode is not AccessMode.DELEGATION:
        try:
            await client.select(folder, readonly=readonly)
        except ImapNo as exc:
            raise PermanentError(
                f"folder {folder!r} of {login.target} cannot be opened ({exc.text})",
                fix="create the folder, or remove it from the mailbox's folder list",
                code="folder-not-found") from None
        return folder
    last: ImapNo | None = None
    for name in shared_folder(options, login.target, folder):
        try:
            await client.select(name, readonly=readonly)
            return name
        except ImapNo as exc:
            last = exc
    raise PermanentError(
        f"delegate {login.user} has no rights on {folder!r} of {login.target} "
        f"({last.text if last else 'not found'})",
        fix=f"grant the delegate lookup and read rights, e.g. as {login.target}: "
            f"SETACL {folder} {login.user} lrsw (or doveadm acl set), or use impersonation",
        code="delegate-rights-missing")


async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    assert profile.incoming is not None
    client = ImapClient(profile.incoming, options)
    try:
        await client.connect()
        await client.login(login)
        opened = [await open_folder(client, login, options, f) for f in mailbox.folders]
    finally:
        await client.logout()
    tls = profile.incoming.tls.value
    return ProbeResult(f"IMAP ({tls}) {profile.incoming.host}:{profile.incoming.port} as "
                       f"{login.mode.value}: opened {', '.join(opened)}")
