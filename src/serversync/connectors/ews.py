"""Exchange Server on-premises over Exchange Web Services, through exchangelib.

exchangelib is blocking (requests), so every call runs in a worker thread
(`asyncio.to_thread`); nothing here touches the network at import or in a constructor. The
seed's three ways in map onto exchangelib's two access types:

* profile credentials, Use Impersonation = Yes → ``IMPERSONATION``: the service account logs
  in and every request carries the ``ExchangeImpersonation`` SOAP header naming the mailbox
  (the account needs the ApplicationImpersonation role on-premises);
* profile credentials, Use Impersonation = No → ``DELEGATE``: the service account's own
  login, opening the user's folders by naming their mailbox (delegate rights, email only —
  `core.rules.act_problem` refuses appointments, contacts and tasks before we get here);
* per-mailbox credentials → ``DELEGATE`` with the user's own login (their own mailbox).

Operations follow Microsoft's EWS reference: GetFolder (probe), SyncFolderItems (incoming;
its SyncState is the cursor, returned to the caller, never kept here), GetItem with
MimeContent, CreateItem with SendAndSaveCopy (outgoing) and SaveOnly (appointments,
contacts, tasks), UpdateItem, DeleteItem. Throttling (``ErrorServerBusy``) becomes a
`TransientError` carrying the server's ``BackOffMilliseconds`` as ``retry_after``; we run
exchangelib with ``FailFast`` so that backing off is the runtime's job, not a sleeping
thread's.

TLS: exchangelib's HTTP adapter is process-wide, so `_TrustAdapter` looks up the profile's
extra CA per endpoint; plain ``http://`` EWS URLs need the profile's ``allow_plaintext``.

Without a fixed ``ews_url`` the EWS URL is found by autodiscover — ours, in
`connectors.ews_discover` (verified TLS only, redirects kept inside the mailbox's domain, the
answer remembered in memory per profile and domain), never exchangelib's, which keeps a cache
file in the temp directory and follows redirects to any domain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import threading
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import requests
import requests.adapters
from exchangelib import (
    DELEGATE,
    IMPERSONATION,
    Account,
    CalendarItem,
    Configuration,
    Contact,
    Credentials,
    FailFast,
    Message,
    Task,
    Version,
)
from exchangelib import errors as ews_errors
from exchangelib.folders import Calendar, Contacts, Inbox, SentItems, Tasks
from exchangelib.indexed_properties import EmailAddress
from exchangelib.items import SEND_AND_SAVE_COPY, SEND_TO_NONE
from exchangelib.properties import ItemId
from exchangelib.protocol import BaseProtocol
from exchangelib.services import CreateItem, SyncFolderItems
from exchangelib.version import EXCHANGE_2013_SP1

from serversync.connectors import ews_discover
from serversync.connectors.net import ConnectOptions, translate
from serversync.connectors.protocols import (
    Disposition,
    FetchBatch,
    FolderCursor,
    KnownFilter,
    ProbeResult,
    RemoteMessage,
)
from serversync.core.errors import (
    AuthError,
    ConfigError,
    ItemError,
    NotFound,
    PermanentError,
    SyncError,
    TransientError,
)
from serversync.core.model import AccessMode, Channel, Endpoint, Mailbox, Profile
from serversync.core.rules import Login

T = TypeVar("T")
FolderName = Literal["inbox", "sentitems", "calendar", "contacts", "tasks"]
_FOLDERS: dict[str, Any] = {"inbox": Inbox, "sentitems": SentItems, "calendar": Calendar,
                            "contacts": Contacts, "tasks": Tasks}
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    # The fields we read and write per kind (exchangelib field names); see `to_fields`.
    "calendar": ("subject", "start", "end", "location", "body", "categories", "is_all_day"),
    "contacts": ("given_name", "surname", "display_name", "company_name", "email_addresses",
                 "categories", "body"),
    "tasks": ("subject", "due_date", "status", "body", "categories", "complete_date"),
}
# The minimum we support (the reference's matrix: Exchange 2013 SP1, 2016, 2019). Fixing
# it saves the version-guessing round trip and keeps our requests the same on every server.
SERVER_VERSION = Version(build=EXCHANGE_2013_SP1)


# ---------------------------------------------------------------- values returned

@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a SyncFolderItems answer."""

    kind: Literal["create", "update", "delete", "read_flag_change"]
    item_id: str
    change_key: str | None = None


@dataclass(frozen=True, slots=True)
class SyncPage:
    """A page of changes and the SyncState to continue from (the cursor)."""

    changes: tuple[Change, ...]
    cursor: str
    more: bool  # IncludesLastItemInRange was false: ask again with ``cursor``


@dataclass(frozen=True, slots=True)
class RemoteItem:
    """An appointment, contact or task as Exchange holds it."""

    item_id: str
    change_key: str
    fields: dict[str, Any] = field(default_factory=dict)


class StaleCursor(TransientError):
    """The server no longer accepts the SyncState: start a full sync with no cursor."""

    code = "cursor-invalid"


class ChangeKeyConflict(SyncError):
    """The item changed on the server since we read it (UpdateItem NeverOverwrite)."""

    code = "conflict"


# ---------------------------------------------------------------- logs without secrets

_AUTH_HEADER = re.compile(r"""(authorization['"]?\s*[:=]\s*['"]?)[^'"\r\n,}]+""", re.IGNORECASE)


class _RedactAuthorization(logging.Filter):
    """exchangelib logs every request's headers at DEBUG (and on errors, at ERROR), which
    includes ``Authorization: Basic <user:password>``: mask the header's value."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "uthorization" in message:
            record.msg, record.args = _AUTH_HEADER.sub(r"\1********", message), None
        return True


_REDACTOR = _RedactAuthorization()


def _install_log_redaction() -> None:
    for name in ("exchangelib.util", "exchangelib.util.xml", "exchangelib.protocol",
                 "exchangelib.services.common"):
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)


# ---------------------------------------------------------------- TLS and endpoints

_TRUST: dict[tuple[str, int], str] = {}
_TRUST_LOCK = threading.Lock()


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """Verify certificates always; add the profile's CA file for its EWS host."""

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        parts = urllib.parse.urlsplit(url)
        ca_file = _TRUST.get(((parts.hostname or "").lower(), parts.port or 443))
        super().cert_verify(conn, url, ca_file or verify, cert)


def _install_adapter(url: str, ca_file: str | None) -> None:
    with _TRUST_LOCK:
        BaseProtocol.HTTP_ADAPTER_CLS = _TrustAdapter
        if ca_file:
            parts = urllib.parse.urlsplit(url)
            _TRUST[((parts.hostname or "").lower(), parts.port or 443)] = ca_file


def endpoint_of(url: str) -> Endpoint:
    parts = urllib.parse.urlsplit(url)
    return Endpoint(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


def check_url(profile: Profile) -> str | None:
    """The fixed EWS URL, refusing plain http unless the profile opted in."""
    url = profile.ews_url
    if not url:
        return None
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ConfigError("ews_url", f"{url!r} is not an http(s) URL",
                          fix="use https://<host>/EWS/Exchange.asmx")
    if scheme == "http" and not profile.allow_plaintext:
        raise ConfigError("ews_url", "plain http sends passwords unencrypted",
                          fix="use https, or set allow_plaintext: true to opt in explicitly")
    return url


def access_type(login: Login) -> str:
    """exchangelib's access type for a `Login` — explicit, never inferred from credentials."""
    return str(IMPERSONATION if login.mode is AccessMode.IMPERSONATION else DELEGATE)


def login_name(login: Login) -> str:
    """Who authenticates over HTTP: the service account for impersonation and delegation."""
    if login.mode in (AccessMode.IMPERSONATION, AccessMode.DELEGATION) and login.service:
        return login.service
    return login.user


# ---------------------------------------------------------------- errors

def auth_fix(login: Login) -> str:
    """What to change when the server refuses the login (401)."""
    return ("update the mailbox's username and secret" if login.mode is AccessMode.OWN
            else "update the profile's service_user and service_secret")


def classify(exc: BaseException, login: Login, where: str) -> SyncError:
    """Map an exchangelib failure to a typed error that says what to fix."""
    who, target = login_name(login), login.target
    if isinstance(exc, SyncError):
        return exc
    if isinstance(exc, ews_errors.ErrorServerBusy):
        return TransientError(
            f"EWS at {where} is throttling {who} (ErrorServerBusy)",
            fix="nothing to do: the mailbox is retried after the server's back-off; if it "
                "persists, lower max_concurrent_connections or review the throttling policy",
            code="throttled", retry_after=exc.back_off)
    if isinstance(exc, ews_errors.ErrorImpersonateUserDenied | ews_errors.ErrorImpersonationFailed):
        return AuthError(
            f"EWS at {where}: service account {who} may not impersonate {target} "
            f"({type(exc).__name__})",
            fix="grant the service account the ApplicationImpersonation role scoped to this "
                "mailbox (New-ManagementRoleAssignment -Role ApplicationImpersonation -User "
                f"{who} -CustomRecipientWriteScope …)", code="impersonation-refused")
    if isinstance(exc, ews_errors.ErrorNonExistentMailbox):
        return PermanentError(f"EWS at {where}: there is no mailbox for {target} "
                              "(ErrorNonExistentMailbox)",
                              fix="check the mailbox's address (its primary SMTP address) and "
                                  "that the user has an Exchange mailbox on this server",
                              code="mailbox-not-found")
    if isinstance(exc, ews_errors.ErrorAccessDenied):
        if login.mode is AccessMode.DELEGATION:
            return AuthError(f"EWS at {where}: {who} has no delegate access to {target}'s "
                             "folders (ErrorAccessDenied)",
                             fix=f"give {who} delegate (Full Access or folder) permission on "
                                 f"{target}'s mailbox, or use impersonation",
                             code="delegate-access-denied")
        return AuthError(f"EWS at {where}: {who} may not open {target} (ErrorAccessDenied)",
                         fix="check the account's permissions on this mailbox",
                         code="permission-denied")
    if isinstance(exc, ews_errors.ErrorSendAsDenied):
        return PermanentError(f"EWS at {where}: {who} may not send as {target} "
                              "(ErrorSendAsDenied)",
                              fix="grant Send As or Send on Behalf on the mailbox, or use "
                                  "impersonation", code="send-as-denied")
    if isinstance(exc, ews_errors.UnauthorizedError):
        return AuthError(f"EWS at {where}: login of {who} was rejected (401)",
                         fix=auth_fix(login), code="auth-failed")
    if isinstance(exc, ews_errors.ErrorInvalidSyncStateData):
        return StaleCursor(f"EWS at {where}: the server no longer accepts the sync state of "
                           f"{target}", fix="nothing to do: the folder is synced again from "
                                            "the start (already tracked items are skipped)")
    if isinstance(exc, ews_errors.ErrorIrresolvableConflict):
        return ChangeKeyConflict(f"EWS at {where}: the item changed on the server meanwhile")
    if isinstance(exc, ews_errors.ErrorItemNotFound):
        return NotFound(f"EWS at {where}: item not found in {target}'s mailbox",
                        code="item-not-found")
    if isinstance(exc, ews_errors.ErrorMailboxStoreUnavailable
                  | ews_errors.ErrorMailboxMoveInProgress
                  | ews_errors.ErrorInternalServerTransientError
                  | ews_errors.ErrorConnectionFailedTransientError
                  | ews_errors.ErrorTimeoutExpired):
        return TransientError(f"EWS at {where}: {type(exc).__name__} for {target}",
                              code="server-busy")
    if isinstance(exc, ews_errors.ErrorSubmissionQuotaExceeded):
        return TransientError(f"EWS at {where}: {target} reached its sending quota",
                              fix="the message is sent again later", code="send-quota")
    if isinstance(exc, requests.exceptions.SSLError):
        inner = exc.__context__ or (exc.args[0] if exc.args else exc)
        while isinstance(inner, BaseException) and not isinstance(inner, OSError) \
                and inner.__context__ is not None:
            inner = inner.__context__
        return translate(inner if isinstance(inner, BaseException) else exc,
                         endpoint_of(where), "EWS")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return TransientError(f"EWS at {where}: cannot connect ({type(exc).__name__})",
                              fix="check ews_url and that the server is running",
                              code="connection-refused")
    if isinstance(exc, requests.exceptions.Timeout):
        return TransientError(f"EWS at {where}: no answer in time", code="timeout")
    if isinstance(exc, ews_errors.ResponseMessageError):
        return PermanentError(f"EWS at {where}: {type(exc).__name__}: {exc}", code="ews-error")
    if isinstance(exc, ews_errors.TransportError | ews_errors.EWSError):
        return TransientError(f"EWS at {where}: {type(exc).__name__}: {exc}",
                              code="ews-transport")
    if isinstance(exc, OSError):
        return translate(exc, endpoint_of(where), "EWS")
    return PermanentError(f"EWS at {where}: unexpected {type(exc).__name__}: {exc}",
                          code="ews-error")


# ---------------------------------------------------------------- the session

class EwsMailbox:
    """One mailbox over EWS. Cheap to build; the first call connects (in a thread).

    Without a fixed ``ews_url`` the first call autodiscovers the EWS URL through
    `ews_discover.lookup` (remembered per profile and mail domain; see there why).
    ``discovery_max_age`` is how old a remembered answer may be: None for sync runs,
    `ews_discover.PROBE_MAX_AGE_S` for Test & Enable, which should show what autodiscover
    says now.
    """

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions, *,
                 discovery_max_age: float | None = None) -> None:
        self.profile, self.login, self.options = profile, login, options
        self.discovery_max_age = discovery_max_age
        self.found: ews_discover.Found | None = None  # the autodiscover answer we use
        self._account: Account | None = None
        self._folders: dict[str, Any] = {}

    @property
    def where(self) -> str:
        if self.profile.ews_url:
            return self.profile.ews_url
        return self.found.ews_url if self.found else f"autodiscover:{self.login.target}"

    def _cache_key(self) -> ews_discover.CacheKey:
        return ews_discover.cache_key(self.profile.name, self.login.target,
                                      self.options.ca_file, self.profile.allow_plaintext)

    async def _run(self, work: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return work()
            except SyncError:
                raise
            except Exception as exc:
                error = classify(exc, self.login, self.where)
                if self.found is not None and error.code != "throttled":
                    # the discovered URL may be what is wrong now: discover again next time
                    ews_discover.forget(self._cache_key(), self.found.ews_url)
                raise error from None
        return await asyncio.to_thread(guarded)

    def _discover(self, secret: str) -> ews_discover.Found:
        def discover() -> ews_discover.Found:
            return ews_discover.Discovery(
                self.login.target, login_name(self.login), secret,
                ca_file=self.options.ca_file, allow_plaintext=self.profile.allow_plaintext,
                timeout=self.options.timeout, auth_fix=auth_fix(self.login)).run()
        return ews_discover.lookup(self._cache_key(), discover,
                                   max_age=self.discovery_max_age)

    def _connect(self) -> Account:
        if self._account is not None:
            return self._account
        url = check_url(self.profile)
        secret = self.login.secret.reveal() if self.login.secret else ""
        if url is None:
            self.found = self._discover(secret)
            url = self.found.ews_url
        credentials = Credentials(username=login_name(self.login), password=secret)
        config = Configuration(
            service_endpoint=url, credentials=credentials, version=SERVER_VERSION,
            retry_policy=FailFast(), max_connections=self.profile.max_concurrent_connections)
        _install_adapter(url, self.options.ca_file)
        _install_log_redaction()
        account = Account(primary_smtp_address=self.login.target, config=config,
                          credentials=credentials, autodiscover=False,
                          access_type=access_type(self.login))
        account.protocol.TIMEOUT = self.options.timeout
        self._account = account
        return account

    def _folder(self, name: str) -> Any:
        if name not in self._folders:
            account = self._connect()
            self._folders[name] = _FOLDERS[name].get_distinguished(root=account.root)
        return self._folders[name]

    async def folder_count(self, name: FolderName) -> int:
        """GetFolder: proves login, access type and mailbox; the folder's item count."""
        return int(await self._run(lambda: self._folder(name).total_count or 0))

    async def sync(self, name: FolderName, cursor: str | None, max_changes: int = 100,
                   ) -> SyncPage:
        """One SyncFolderItems call (IdOnly shape): the changes after ``cursor``."""
        def work() -> SyncPage:
            folder = self._folder(name)
            service = SyncFolderItems(account=self._connect())
            changes: list[Change] = []
            for kind, item in service.call(folder=folder, shape="IdOnly",
                                           additional_fields=set(), sync_state=cursor,
                                           ignore=None, max_changes_returned=max_changes,
                                           sync_scope=None):
                if kind == "delete":
                    changes.append(Change("delete", item.id))
                elif kind == "read_flag_change":
                    changes.append(Change("read_flag_change", item[0].id))
                elif isinstance(item, Exception):
                    raise item
                else:
                    changes.append(Change(kind, item.id, item.changekey))
            return SyncPage(tuple(changes), service.sync_state or cursor or "",
                            more=not service.includes_last_item_in_range)
        return await self._run(work)

    async def fetch_mime(self, item_ids: Sequence[str]) -> list[bytes | SyncError]:
        """GetItem with MimeContent, in order; a missing item is an error in its place."""
        def work() -> list[bytes | SyncError]:
            account = self._connect()
            found: list[bytes | SyncError] = []
            for item_id, item in zip(item_ids, account.fetch(
                    ids=[(i, None) for i in item_ids], only_fields=["mime_content"]),
                    strict=True):
                if isinstance(item, Exception):
                    found.append(classify(item, self.login, self.where))
                elif not item.mime_content:
                    found.append(ItemError(f"EWS item {item_id} has no MIME content",
                                           code="no-mime"))
                else:
                    mime = item.mime_content
                    found.append(mime if isinstance(mime, bytes) else mime.encode())
            return found
        return await self._run(work)

    async def send(self, mime: bytes, *, save_copy: bool = True) -> None:
        """CreateItem with SendAndSaveCopy (the copy lands in Sent Items) or SendOnly."""
        def work() -> None:
            account = self._connect()
            message = Message(account=account, mime_content=mime)
            folder = self._folder("sentitems") if save_copy else None
            result = CreateItem(account=account).get(
                items=[message], folder=folder,
                message_disposition=SEND_AND_SAVE_COPY if save_copy else "SendOnly",
                send_meeting_invitations=SEND_TO_NONE)
            if isinstance(result, Exception):
                raise result
        await self._run(work)

    async def sent_contains(self, message_id: str) -> bool:
        """FindItem in Sent Items restricted to one Internet Message-ID (IsEqualTo).

        The outgoing job's proof that an interrupted send went out: SendAndSaveCopy files
        the copy there only once the server accepted the message.
        """
        def work() -> bool:
            return bool(self._folder("sentitems").filter(message_id=message_id).exists())
        return await self._run(work)

    # ------------------------------------------------------------ appointments, contacts, tasks

    async def get_items(self, name: FolderName, item_ids: Sequence[str],
                        ) -> list[RemoteItem | SyncError]:
        """GetItem for appointments, contacts or tasks, in order."""
        def work() -> list[RemoteItem | SyncError]:
            account = self._connect()
            out: list[RemoteItem | SyncError] = []
            for item in account.fetch(ids=[(i, None) for i in item_ids]):
                if isinstance(item, Exception):
                    out.append(classify(item, self.login, self.where))
                else:
                    out.append(RemoteItem(item.id, item.changekey, to_fields(name, item)))
            return out
        return await self._run(work)

    async def create_item(self, name: FolderName, fields: dict[str, Any]) -> RemoteItem:
        """CreateItem (SaveOnly, no meeting invitations) in the calendar, contacts or tasks."""
        def work() -> RemoteItem:
            folder = self._folder(name)
            item = from_fields(name, fields, account=self._connect(), folder=folder)
            item.save(send_meeting_invitations=SEND_TO_NONE) if name == "calendar" \
                else item.save()
            return RemoteItem(item.id, item.changekey, dict(fields))
        return await self._run(work)

    async def update_item(self, name: FolderName, item_id: str, change_key: str,
                          fields: dict[str, Any]) -> RemoteItem:
        """UpdateItem with NeverOverwrite: a stale change key raises `ChangeKeyConflict`."""
        def work() -> RemoteItem:
            account = self._connect()
            item = from_fields(name, fields, account=account, folder=self._folder(name))
            item._id = ItemId(id=item_id, changekey=change_key)
            kwargs: dict[str, Any] = {"update_fields": [f for f in fields if f in
                                                        ITEM_FIELDS[name]],
                                      "conflict_resolution": "NeverOverwrite"}
            if name == "calendar":
                kwargs["send_meeting_invitations"] = SEND_TO_NONE
            item.save(**kwargs)
            return RemoteItem(item.id, item.changekey, dict(fields))
        return await self._run(work)

    async def delete_item(self, name: FolderName, item_id: str) -> None:
        """DeleteItem (HardDelete; no cancellations sent). A missing item is already gone."""
        def work() -> None:
            account = self._connect()
            item = from_fields(name, {}, account=account, folder=self._folder(name))
            item._id = ItemId(id=item_id, changekey=None)
            try:
                if name == "calendar":
                    item.delete(send_meeting_cancellations=SEND_TO_NONE)
                elif name == "tasks":
                    item.delete(affected_task_occurrences="AllOccurrences")
                else:
                    item.delete()
            except ews_errors.ErrorItemNotFound:
                return
        await self._run(work)

    async def close(self) -> None:
        account, self._account = self._account, None
        if account is not None:
            await asyncio.to_thread(account.protocol.close)


# ---------------------------------------------------------------- field mapping

def to_fields(name: str, item: Any) -> dict[str, Any]:
    """The fields we sync, as plain Python values (datetimes in UTC, strings, lists)."""
    fields: dict[str, Any] = {}
    for key in ITEM_FIELDS.get(name, ()):
        value = getattr(item, key, None)
        if key == "email_addresses":
            value = [e.email for e in (value or []) if getattr(e, "email", None)]
        elif isinstance(value, dt.datetime):
            value = value.astimezone(dt.UTC)
        elif key == "body" and value is not None:
            value = str(value)
        elif key == "categories" and value is None:
            value = []
        fields[key] = value
    return fields


def from_fields(name: str, fields: dict[str, Any], *, account: Account, folder: Any) -> Any:
    """An exchangelib item for ``name`` carrying ``fields`` (unknown keys are refused)."""
    unknown = set(fields) - set(ITEM_FIELDS[name])
    if unknown:
        raise ConfigError("fields", f"not synced for {name}: {', '.join(sorted(unknown))}")
    values = dict(fields)
    if "email_addresses" in values:
        values["email_addresses"] = [
            EmailAddress(email=address, label=label) for address, label in zip(
                values["email_addresses"], ("EmailAddress1", "EmailAddress2", "EmailAddress3"),
                strict=False)]
    for key in ("start", "end", "complete_date"):
        if isinstance(values.get(key), dt.datetime):
            from exchangelib import EWSDateTime
            values[key] = EWSDateTime.from_datetime(values[key].astimezone(dt.UTC))
    if "due_date" in values and isinstance(values["due_date"], dt.datetime):
        from exchangelib import EWSDateTime
        values["due_date"] = EWSDateTime.from_datetime(values["due_date"].astimezone(dt.UTC))
    model = {"calendar": CalendarItem, "contacts": Contact, "tasks": Task}[name]
    return model(account=account, folder=folder, **values)


# ---------------------------------------------------------------- Test & Enable

async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    """Open the folders a channel needs (GetFolder); nothing is changed or sent.

    When the URL came from autodiscover, the summary says which URL and which autodiscover
    endpoint gave it, so the administrator sees what Test & Enable found.
    """
    ews = EwsMailbox(profile, login, options,
                     discovery_max_age=ews_discover.PROBE_MAX_AGE_S)
    try:
        if channel is Channel.INCOMING:
            count = await ews.folder_count("inbox")
            found = f"Inbox ({count} items)"
        elif channel is Channel.OUTGOING:
            await ews.folder_count("sentitems")
            found = "Sent Items (SendAndSaveCopy possible)"
        else:
            counts = [await ews.folder_count(name) for name in ("calendar", "contacts", "tasks")]
            found = "Calendar ({}), Contacts ({}), Tasks ({})".format(*counts)
    finally:
        await ews.close()
    how = {AccessMode.IMPERSONATION: f"impersonating as {login_name(login)}",
           AccessMode.DELEGATION: f"as delegate {login_name(login)}"}.get(
        login.mode, f"as {login_name(login)}")
    via = ""
    if ews.found is not None:
        via = f" (found by autodiscover at {ews.found.via})"
    return ProbeResult(f"EWS {ews.where}{via}: {mailbox.address} {how}: {found}")


# ---------------------------------------------------------------- incoming mail source

# Configured folder names → EWS distinguished folder ids. Only the well-known folders are
# reachable this way; other folders would need FindFolder by display name (not yet done).
_MAIL_FOLDERS = {"inbox": "inbox", "sent": "sentitems", "sent items": "sentitems",
                 "sentitems": "sentitems"}


class EwsSource:
    """A mailbox's Inbox (and Sent Items) over EWS as a `protocols.MailSource`.

    The cursor is the folder's SyncState (``FolderCursor.token``): each batch is one
    SyncFolderItems page of at most ``batch_size`` changes whose new messages are read with
    GetItem (MimeContent). Messages already processed (``known``) are not downloaded again,
    so a replay after a crash, or a resync after the server dropped our SyncState, costs one
    listing and no duplicates. Remote ids are EWS ItemIds.
    """

    def __init__(self, profile: Profile, mailbox: Mailbox, login: Login,
                 options: ConnectOptions) -> None:
        self.mailbox = mailbox
        self.ews = EwsMailbox(profile, login, options)

    async def open(self) -> None:
        await self.ews.folder_count("inbox")  # connect, check access and the mailbox

    async def close(self) -> None:
        await self.ews.close()

    async def resolve_folder(self, folder: str) -> str:
        name = _MAIL_FOLDERS.get(folder.strip().lower())
        if name is None:
            raise PermanentError(
                f"EWS: folder {folder!r} of {self.mailbox.address} cannot be synced; only the "
                "Inbox and Sent Items are reachable over EWS here",
                fix="set the mailbox's folders to INBOX (and Sent)", code="folder-not-found")
        return name

    async def fetch(self, folder: str, cursor: FolderCursor | None, *, batch_size: int,
                    known: KnownFilter) -> AsyncGenerator[FetchBatch, None]:
        name: Any = await self.resolve_folder(folder)
        token = cursor.token if cursor is not None else None
        while True:
            try:
                page = await self.ews.sync(name, token, max_changes=batch_size)
            except StaleCursor:
                if token is None:
                    raise
                token = None  # read the folder again; `known` skips what we have
                continue
            created = [c.item_id for c in page.changes if c.kind == "create"]
            seen = await known(created) if created else set()
            wanted = [i for i in created if i not in seen]
            messages: list[RemoteMessage] = []
            for item_id, found in zip(wanted, await self.ews.fetch_mime(wanted) if wanted
                                      else [], strict=True):
                if isinstance(found, NotFound):
                    continue  # deleted between the listing and the read: nothing to track
                if isinstance(found, ItemError):
                    found = b""  # kept as an empty message; the service quarantines it
                if isinstance(found, SyncError):
                    raise found
                messages.append(RemoteMessage(folder, item_id, found))
            yield FetchBatch(folder, messages, FolderCursor(token=page.cursor))
            token = page.cursor
            if not page.more:
                return

    async def finish(self, folder: str, dispositions: Sequence[Disposition]) -> None:
        """Leave, or delete (to Deleted Items); flag and move are not offered on EWS yet."""
        doomed = [d.remote_id for d in dispositions if d.action == "delete"]
        unsupported = sorted({d.action for d in dispositions
                              if d.action not in ("leave", "delete")})
        if doomed:
            def work() -> None:
                account = self.ews._connect()
                for result in account.bulk_delete(ids=[(i, None) for i in doomed],
                                                  delete_type="MoveToDeletedItems"):
                    if isinstance(result, Exception) and not isinstance(
                            result, ews_errors.ErrorItemNotFound):
                        raise result
            await self.ews._run(work)
        if unsupported:
            raise PermanentError(
                f"EWS: after-processing {', '.join(unsupported)} is not supported for "
                f"{self.mailbox.address}", fix="set after_processing to leave (or delete for "
                "queues)", code="unsupported-disposition")


def source(profile: Profile, mailbox: Mailbox, login: Login,
           options: ConnectOptions) -> EwsSource:
    """The incoming source of an Exchange (EWS) mailbox (`services.incoming` factory)."""
    return EwsSource(profile, mailbox, login, options)
