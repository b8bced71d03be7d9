"""Exchange Online over Microsoft Graph (REST, v1.0), with app-only access, through httpx.

The Exchange Online profile authenticates server to server: a client-credentials token
(`connectors.oauth`) for ``https://graph.microsoft.com/.default`` carries the application
permissions the tenant granted (Mail.ReadWrite, Mail.Send, Calendars.ReadWrite,
Contacts.ReadWrite, Tasks.ReadWrite.All), scoped to mailboxes by RBAC for Applications or
an Application Access Policy — Microsoft's replacement for ApplicationImpersonation. Every
request names the mailbox in its path (``/users/{address}/…``).

What the channels use (Graph v1.0 reference):

* mail: ``mailFolders/{folder}/messages/delta`` (the deltaLink is the cursor; a nextLink is
  a cursor too, mid-way), ``messages/{id}/$value`` for the MIME, ``sendMail`` with a
  base64 MIME body (saved to Sent Items), PATCH/move/DELETE for dispositions;
* appointments, contacts, tasks: ``calendarView/delta``, ``contacts/delta``,
  ``todo/lists/{id}/tasks/delta`` and POST/PATCH/DELETE on the items;
* change notifications: ``/subscriptions`` created for a mailbox's Inbox (with a
  ``lifecycleNotificationUrl``), renewed before they expire (mail subscriptions live at most
  4230 minutes) and reauthorized on request (``/subscriptions/{id}/reauthorize``); delta
  polling remains the safety net, notifications only wake it up early.

Throttling: 429, 503 and 504 carry ``Retry-After``; short waits are honoured in place (up
to ``max_wait``), longer ones become a `TransientError` with ``retry_after`` so the runtime
backs the mailbox off. An expired token (401) is refreshed once.

No secret is ever put in a URL (tokens go in the Authorization header, the client secret or
the signed client assertion in the token request's POST body) or in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from serversync.connectors import certificates
from serversync.connectors.net import ConnectOptions, tls_context, translate
from serversync.connectors.oauth import (
    REFRESH_TOKENS,
    AccessToken,
    DeviceCode,
    TokenCache,
    finish_device_sign_in,
    retry_after,
    start_device_sign_in,
)
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
    NotFound,
    PermanentError,
    SyncError,
    TransientError,
)
from serversync.core.model import AccessMode, Channel, Endpoint, Mailbox, Profile
from serversync.core.rules import Login
from serversync.core.secret import Secret

GRAPH_ROOT = "https://graph.microsoft.com/v1.0"
TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
SCOPE = "https://graph.microsoft.com/.default"
# What a user consents to for their own mailbox (delegated permissions; offline_access makes
# the token endpoint return the refresh token we keep).
DELEGATED_SCOPE = ("offline_access https://graph.microsoft.com/Mail.ReadWrite "
                   "https://graph.microsoft.com/Mail.Send "
                   "https://graph.microsoft.com/Calendars.ReadWrite "
                   "https://graph.microsoft.com/Contacts.ReadWrite "
                   "https://graph.microsoft.com/Tasks.ReadWrite")
MAIL_SUBSCRIPTION_MAX = dt.timedelta(minutes=4230)  # Graph's limit for Outlook resources
RENEW_MARGIN = dt.timedelta(hours=6)
# The application permission each operation needs, for messages that say what to grant.
ROLE_MAIL_READ = "Mail.ReadWrite (or Mail.Read)"
ROLE_MAIL_SEND = "Mail.Send"
ROLE_CALENDARS = "Calendars.ReadWrite"
ROLE_CONTACTS = "Contacts.ReadWrite"
ROLE_TASKS = "Tasks.ReadWrite.All"


class StaleDelta(TransientError):
    """The delta token is no longer valid (410 / syncStateNotFound): resync from scratch."""

    code = "cursor-invalid"


class EtagConflict(SyncError):
    """PATCH with If-Match found a newer version on the server (412)."""

    code = "conflict"


@dataclass(frozen=True, slots=True)
class DeltaPage:
    """One page of a delta query.

    ``cursor`` is the URL to continue from: the nextLink while ``more`` is true, the
    deltaLink when the round is complete. Store it with the items of this page.
    """

    items: tuple[Mapping[str, Any], ...]
    cursor: str
    more: bool

    @property
    def removed(self) -> list[str]:
        return [str(i["id"]) for i in self.items if "@removed" in i]

    @property
    def changed(self) -> list[Mapping[str, Any]]:
        return [i for i in self.items if "@removed" not in i]


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    resource: str
    expires_at: dt.datetime
    client_state: str | None = None

    def due(self, now: dt.datetime, margin: dt.timedelta = RENEW_MARGIN) -> bool:
        """Renew when less than ``margin`` is left (always before it lapses)."""
        return self.expires_at - now <= margin


def token_url(profile: Profile) -> str:
    if profile.token_url:
        return profile.token_url.replace("{tenant}", urllib.parse.quote(profile.tenant_id or ""))
    if not profile.tenant_id:
        raise ConfigError("tenant_id", "is required for Exchange Online")
    return TOKEN_URL.format(tenant=urllib.parse.quote(profile.tenant_id, safe=""))


def device_code_url(profile: Profile) -> str:
    """The device authorization endpoint beside the token endpoint (``…/devicecode``)."""
    url = token_url(profile)
    return url[: -len("/token")] + "/devicecode" if url.endswith("/token") else url + "/devicecode"


async def sign_in(profile: Profile, mailbox: Mailbox, options: ConnectOptions,
                  on_code: Callable[[DeviceCode], None], *,
                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                  transport: httpx.AsyncBaseTransport | None = None) -> AccessToken:
    """A user's own sign-in for their mailbox (device authorization grant, RFC 8628).

    The user opens Microsoft's page on any device and enters the code ``on_code`` shows;
    the answer carries the refresh token the mailbox keeps. `start_sign_in` and
    `finish_sign_in` are the two halves, for callers that show the code elsewhere (the
    REST API and the admin UI answer at once and poll in the background).
    """
    code = await start_sign_in(profile, mailbox, options, transport=transport)
    on_code(code)
    return await finish_sign_in(profile, mailbox, options, code, sleep=sleep,
                                transport=transport)


def _sign_in_client(profile: Profile, options: ConnectOptions,
                    transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    _check_https("token_url", token_url(profile), profile)
    return httpx.AsyncClient(timeout=options.timeout, follow_redirects=False,
                             transport=transport, verify=tls_context(options.ca_file))


async def start_sign_in(profile: Profile, mailbox: Mailbox, options: ConnectOptions, *,
                        transport: httpx.AsyncBaseTransport | None = None) -> DeviceCode:
    """Ask Microsoft for a device code and the user code to show (RFC 8628 §3.1–3.2)."""
    async with _sign_in_client(profile, options, transport) as http:
        return await start_device_sign_in(http, device_code_url(profile),
                                          profile.client_id or "", DELEGATED_SCOPE,
                                          what=f"Graph sign-in for {mailbox.address}")


async def finish_sign_in(profile: Profile, mailbox: Mailbox, options: ConnectOptions,
                         code: DeviceCode, *,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                         transport: httpx.AsyncBaseTransport | None = None) -> AccessToken:
    """Poll until the user signed in; the token, which must be the mailbox's own user's.

    A sign-in by anyone else is refused (it would sync their mailbox instead), and so is an
    answer without a refresh token (nothing could be stored to sync with later).
    """
    what = f"Graph sign-in for {mailbox.address}"
    async with _sign_in_client(profile, options, transport) as http:
        token = await finish_device_sign_in(http, token_url(profile), profile.client_id or "",
                                            code, what=what, client_secret=profile.client_secret,
                                            sleep=sleep)
    if token.refresh_token is None:
        raise AuthError(f"{what}: Microsoft returned no refresh token",
                        fix="add the delegated permission offline_access to the app "
                            "registration", code="permission-missing")
    wanted = {mailbox.address.lower(), (mailbox.username or mailbox.address).lower()}
    names = {str(token.claims[c]).lower() for c in ("upn", "preferred_username",
                                                    "unique_name", "email")
             if token.claims.get(c)}
    if names and not names & wanted:
        raise AuthError(f"{what}: signed in as {sorted(names)[0]}, not as the mailbox's user",
                        fix=f"sign in as {mailbox.username or mailbox.address}",
                        code="wrong-user")
    return token


def _check_https(field: str, url: str, profile: Profile) -> None:
    if url.startswith("http://") and not profile.allow_plaintext:
        raise ConfigError(field, "plain http would send tokens unencrypted",
                          fix="use https, or set allow_plaintext: true to opt in explicitly")


def _error(response: httpx.Response) -> tuple[str, str]:
    try:
        data = response.json()
    except ValueError:
        return "", ""
    error = data.get("error", {}) if isinstance(data, dict) else {}
    if not isinstance(error, dict):
        return str(error), ""
    return str(error.get("code", "")), str(error.get("message", ""))


class GraphClient:
    """Graph for one mailbox. Use as ``async with GraphClient(...) as graph``."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions, *,
                 tokens: TokenCache | None = None, max_wait: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.profile, self.login, self.options = profile, login, options
        self.tokens = tokens or TokenCache()
        self.max_wait = max_wait
        self.root = (profile.api_url or GRAPH_ROOT).rstrip("/")
        self.user = login.target
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self.token: AccessToken | None = None

    @property
    def base(self) -> str:
        return f"{self.root}/users/{urllib.parse.quote(self.user, safe='@')}"

    async def __aenter__(self) -> GraphClient:
        _check_https("api_url", self.root, self.profile)
        _check_https("token_url", token_url(self.profile), self.profile)
        self._http = httpx.AsyncClient(
            timeout=self.options.timeout, follow_redirects=False, transport=self._transport,
            verify=tls_context(self.options.ca_file))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ------------------------------------------------------------ tokens and requests

    @property
    def delegated(self) -> bool:
        """A user's own consent (refresh token) rather than the app's own permissions."""
        return self.login.mode is AccessMode.OWN

    def _token_key(self) -> tuple[str, ...]:
        if self.delegated:
            return (token_url(self.profile), self.profile.client_id or "", DELEGATED_SCOPE,
                    self.login.target)
        return (token_url(self.profile), self.profile.client_id or "", SCOPE)

    async def access_token(self, *, force: bool = False) -> AccessToken:
        assert self._http is not None, "use GraphClient as an async context manager"
        key = self._token_key()
        if force:
            self.tokens.forget(key)
        what = (f"Graph token for {self.login.target}" if self.delegated
                else f"Graph token for profile {self.profile.name!r}")
        used: list[Secret] = []

        def form() -> dict[str, str]:
            built = self._token_form()
            if "refresh_token" in built:
                used.append(Secret(built["refresh_token"]))
            return built
        token = await self.tokens.get(key, self._http, token_url(self.profile), form, what=what)
        if used and token.refresh_token is not None:
            REFRESH_TOKENS.rotated(self.login.target, used[0], token.refresh_token)
        self.token = token
        return token

    def _token_form(self) -> dict[str, str]:
        """The token request.

        App-only: the client-credentials grant with the client secret, or a client assertion
        signed with the profile's certificate (refused here, before sending, if it is not
        valid now). Delegated: the refresh-token grant with the newest refresh token this
        process has seen for the mailbox (plus the client secret of a confidential client).
        """
        client_id = self.profile.client_id or ""
        if self.delegated:
            stored = REFRESH_TOKENS.current(self.login.target, self.login.secret)
            form = {"grant_type": "refresh_token", "client_id": client_id,
                    "refresh_token": stored.reveal() if stored else "",
                    "scope": DELEGATED_SCOPE}
            if self.profile.client_secret is not None:
                form["client_secret"] = self.profile.client_secret.reveal()
            return form
        form = {"grant_type": "client_credentials", "client_id": client_id}
        if self.profile.client_certificate:
            certificate = self.certificate()
            certificate.check_valid()
            form["client_assertion_type"] = certificates.CLIENT_ASSERTION_TYPE
            form["client_assertion"] = certificate.assertion(client_id, token_url(self.profile))
        else:
            form["client_secret"] = self.login.secret.reveal() if self.login.secret else ""
        form["scope"] = SCOPE
        return form

    def certificate(self) -> certificates.ClientCertificate:
        """The profile's client certificate (the profile must have one)."""
        assert self.profile.client_certificate is not None
        return certificates.load(self.profile.client_certificate.reveal())

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            if not path_or_url.startswith(self.root):
                # nextLink/deltaLink must point back at the API we configured
                raise PermanentError(f"Graph returned a link outside {self.root}",
                                     code="graph-error")
            return path_or_url
        if path_or_url.startswith("/users/") or path_or_url.startswith("/subscriptions"):
            return self.root + path_or_url
        return self.base + path_or_url

    async def request(self, method: str, path: str, *, role: str = "", expect: Sequence[int] = (200,),
                      json_body: Any = None, content: bytes | None = None,
                      params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None,
                      retry_on: Sequence[int] = (429, 503, 504)) -> httpx.Response:
        """One Graph call with token refresh, Retry-After handling and error mapping.

        ``retry_on``: the statuses that mean "not done, try later". A request that must not
        run twice leaves out 504 (the gateway gave up waiting; the backend may have done it).
        """
        assert self._http is not None, "use GraphClient as an async context manager"
        url = self._url(path)
        refreshed = False
        attempts = 0
        while True:
            token = await self.access_token()
            sent = {"Authorization": f"Bearer {token.value.reveal()}",
                    "Accept": "application/json", **(headers or {})}
            try:
                response = await self._http.request(method, url, json=json_body, content=content,
                                                    params=params, headers=sent)
            except httpx.TransportError as exc:
                parsed = httpx.URL(url)
                raise translate(exc.__cause__ or exc.__context__ or exc,
                                Endpoint(parsed.host, parsed.port or 443), "Graph") from None
            status = response.status_code
            if status in expect:
                return response
            if status == 401 and not refreshed:
                refreshed = True
                await self.access_token(force=True)
                continue
            if status in retry_on:
                wait = retry_after(response)
                attempts += 1
                if wait is not None and wait <= self.max_wait and attempts <= 3:
                    await asyncio.sleep(wait)
                    continue
                raise TransientError(
                    f"Graph is throttling requests for {self.user} ({status})",
                    fix="nothing to do: the mailbox is retried after the server's Retry-After",
                    code="throttled", retry_after=wait)
            raise self.classify(response, role)

    def classify(self, response: httpx.Response, role: str) -> SyncError:
        status = response.status_code
        code, message = _error(response)
        who = f"app {self.profile.client_id}"
        if status == 401:
            return AuthError(f"Graph rejected the access token of {who} ({code or status})",
                             fix="check the app registration's secret or certificate and that "
                                 "the tenant granted admin consent", code="token-rejected")
        if status == 403:
            need = f" the application permission {role}" if role else " permission"
            return AuthError(
                f"Graph: {who} may not access {self.user}'s mailbox ({code}: {message})",
                fix=f"grant{need} to the app registration with admin consent, and include "
                    f"{self.user} in its RBAC for Applications scope (or Application Access "
                    "Policy)", code="permission-missing")
        if status == 404 and code == "MailboxNotEnabledForRESTAPI":
            return PermanentError(
                f"Graph: {self.user} has no Exchange Online mailbox reachable by REST "
                "(MailboxNotEnabledForRESTAPI)",
                fix="assign an Exchange Online licence; a mailbox still on-premises needs an "
                    "exchange (EWS) profile", code="mailbox-not-enabled")
        lowered = message.lower()
        if status in (400, 404) and (
                code in ("ErrorInvalidUser", "MailboxNotFound", "Request_ResourceNotFound")
                or (code == "ResourceNotFound" and ("user" in lowered or "mailbox" in lowered))):
            return PermanentError(f"Graph: no mailbox {self.user} ({code}: {message})",
                                  fix="check the mailbox's address (a user with an Exchange "
                                      "Online mailbox in this tenant)",
                                  code="mailbox-not-found")
        if status == 404:
            return NotFound(f"Graph: not found ({code or status})", code="item-not-found")
        if status == 410 or code in ("syncStateNotFound", "resyncRequired", "SyncStateInvalid"):
            return StaleDelta(f"Graph: the delta token for {self.user} expired ({code or status})",
                              fix="nothing to do: the folder is read again from the start")
        if status == 412:
            return EtagConflict(f"Graph: the item changed on the server ({code})")
        if status >= 500:
            return TransientError(f"Graph server error {status} ({code})", code="server-busy",
                                  retry_after=retry_after(response))
        return PermanentError(f"Graph: {status} {code}: {message}", code="graph-error")

    # ------------------------------------------------------------ mail

    async def folder(self, name: str, *, role: str = ROLE_MAIL_READ) -> Mapping[str, Any]:
        response = await self.request(
            "GET", f"/mailFolders/{urllib.parse.quote(name)}", role=role,
            params={"$select": "id,displayName,totalItemCount"})
        data: Mapping[str, Any] = response.json()
        return data

    async def delta(self, first: str, cursor: str | None, *, role: str, page_size: int = 50,
                    params: Mapping[str, str] | None = None) -> DeltaPage:
        """One page of a delta query, from ``cursor`` or from the start at ``first``."""
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        if cursor:
            response = await self.request("GET", cursor, role=role, headers=headers)
        else:
            response = await self.request("GET", first, role=role, headers=headers,
                                          params=params)
        data = response.json()
        items = tuple(data.get("value", []))
        if "@odata.nextLink" in data:
            return DeltaPage(items, str(data["@odata.nextLink"]), more=True)
        if "@odata.deltaLink" in data:
            return DeltaPage(items, str(data["@odata.deltaLink"]), more=False)
        raise PermanentError("Graph delta answer has neither nextLink nor deltaLink",
                             code="graph-error")

    async def mail_delta(self, folder: str, cursor: str | None, *, page_size: int = 50,
                         ) -> DeltaPage:
        return await self.delta(
            f"/mailFolders/{urllib.parse.quote(folder)}/messages/delta", cursor,
            role=ROLE_MAIL_READ, page_size=page_size,
            params={"$select": "id,internetMessageId,receivedDateTime,subject"})

    async def mime(self, message_id: str) -> bytes:
        response = await self.request("GET", f"/messages/{urllib.parse.quote(message_id)}/$value",
                                      role=ROLE_MAIL_READ)
        return response.content

    async def send_mime(self, mime: bytes, *, save_copy: bool = True) -> None:
        """sendMail with the whole MIME message (base64, text/plain); a copy goes to Sent Items.

        Graph saves to Sent Items unless the JSON form sets saveToSentItems=false, which
        MIME bodies cannot express; ``save_copy=False`` therefore deletes nothing and is
        refused rather than silently ignored.
        """
        if not save_copy:
            raise ConfigError("save_copy", "Graph's MIME sendMail always saves to Sent Items")
        await self.request("POST", "/sendMail", role=ROLE_MAIL_SEND, expect=(202,),
                           content=base64.b64encode(mime), headers={"Content-Type": "text/plain"},
                           retry_on=(429, 503))  # a 504 may have sent it: never retried here

    async def sent_contains(self, internet_message_id: str) -> bool:
        """Whether Sent Items holds a message with this Message-ID (``$filter`` on
        ``internetMessageId``): the outgoing job's proof that an interrupted send went out."""
        quoted = internet_message_id.replace("'", "''")
        response = await self.request(
            "GET", "/mailFolders/sentitems/messages", role=ROLE_MAIL_READ,
            params={"$filter": f"internetMessageId eq '{quoted}'", "$select": "id", "$top": "1"})
        return bool(response.json().get("value"))

    async def flag(self, message_id: str) -> None:
        await self.request("PATCH", f"/messages/{urllib.parse.quote(message_id)}",
                           role=ROLE_MAIL_READ, json_body={"flag": {"flagStatus": "flagged"}})

    async def move(self, message_id: str, destination: str) -> None:
        await self.request("POST", f"/messages/{urllib.parse.quote(message_id)}/move",
                           role=ROLE_MAIL_READ, expect=(200, 201),
                           json_body={"destinationId": destination})

    async def delete(self, path: str, *, role: str) -> None:
        """DELETE an item; one that is already gone counts as deleted."""
        try:
            await self.request("DELETE", path, role=role, expect=(204,))
        except NotFound:
            return

    async def folder_id(self, name: str) -> str:
        """A well-known folder name (inbox, archive, …) or a top-level display name."""
        try:
            return str((await self.folder(name))["id"])
        except NotFound:
            pass
        response = await self.request(
            "GET", "/mailFolders", role=ROLE_MAIL_READ,
            params={"$filter": f"displayName eq '{name.replace(chr(39), chr(39) * 2)}'",
                    "$select": "id,displayName"})
        found = response.json().get("value", [])
        if not found:
            raise PermanentError(f"Graph: {self.user} has no mail folder {name!r}",
                                 fix="create the folder or fix the mailbox's folder settings",
                                 code="folder-not-found")
        return str(found[0]["id"])

    # ------------------------------------------------------------ events, contacts, tasks

    async def default_todo_list(self) -> str:
        response = await self.request("GET", "/todo/lists", role=ROLE_TASKS)
        lists = response.json().get("value", [])
        for entry in lists:
            if entry.get("wellknownListName") == "defaultList":
                return str(entry["id"])
        if lists:
            return str(lists[0]["id"])
        raise PermanentError(f"Graph: {self.user} has no To Do task list", code="folder-not-found")

    async def events_delta(self, cursor: str | None, *, start: dt.datetime, end: dt.datetime,
                           page_size: int = 50) -> DeltaPage:
        return await self.delta("/calendarView/delta", cursor, role=ROLE_CALENDARS,
                                page_size=page_size,
                                params={"startDateTime": _iso(start), "endDateTime": _iso(end)})

    async def contacts_delta(self, cursor: str | None, *, page_size: int = 50) -> DeltaPage:
        return await self.delta("/contacts/delta", cursor, role=ROLE_CONTACTS,
                                page_size=page_size)

    async def tasks_delta(self, list_id: str, cursor: str | None, *, page_size: int = 50,
                          ) -> DeltaPage:
        return await self.delta(f"/todo/lists/{urllib.parse.quote(list_id)}/tasks/delta", cursor,
                                role=ROLE_TASKS, page_size=page_size)

    async def create(self, collection: str, body: Mapping[str, Any], *, role: str,
                     ) -> Mapping[str, Any]:
        response = await self.request("POST", collection, role=role, expect=(201,),
                                      json_body=dict(body))
        data: Mapping[str, Any] = response.json()
        return data

    async def update(self, path: str, body: Mapping[str, Any], *, role: str,
                     etag: str | None = None) -> Mapping[str, Any]:
        """PATCH; with ``etag`` the server refuses (412 → `EtagConflict`) if it changed."""
        headers = {"If-Match": etag} if etag else None
        response = await self.request("PATCH", path, role=role, json_body=dict(body),
                                      headers=headers)
        data: Mapping[str, Any] = response.json()
        return data

    # ------------------------------------------------------------ change notifications

    async def subscribe(self, resource: str, notification_url: str, *, client_state: str,
                        change_type: str = "created,updated,deleted",
                        lifecycle_url: str | None = None,
                        now: dt.datetime | None = None,
                        lifetime: dt.timedelta = MAIL_SUBSCRIPTION_MAX) -> Subscription:
        """Create a subscription; with ``lifecycle_url`` Graph also sends lifecycle
        notifications there (it can only be set at creation, and is validated like the
        notification URL)."""
        expires = (now or dt.datetime.now(dt.UTC)) + lifetime - dt.timedelta(minutes=1)
        body = {"changeType": change_type, "notificationUrl": notification_url}
        if lifecycle_url:
            body["lifecycleNotificationUrl"] = lifecycle_url
        body |= {"resource": resource, "expirationDateTime": _iso(expires),
                 "clientState": client_state}
        response = await self.request("POST", "/subscriptions", role=ROLE_MAIL_READ,
                                      expect=(201,), json_body=body)
        return _subscription(response.json())

    async def reauthorize(self, subscription_id: str) -> None:
        """``POST /subscriptions/{id}/reauthorize`` (no body; 204): answers a
        ``reauthorizationRequired`` lifecycle event without changing the expiry."""
        await self.request("POST", f"/subscriptions/{urllib.parse.quote(subscription_id)}"
                           "/reauthorize", role=ROLE_MAIL_READ, expect=(200, 204))

    async def renew(self, subscription: Subscription, *, now: dt.datetime | None = None,
                    lifetime: dt.timedelta = MAIL_SUBSCRIPTION_MAX) -> Subscription:
        expires = (now or dt.datetime.now(dt.UTC)) + lifetime - dt.timedelta(minutes=1)
        response = await self.request(
            "PATCH", f"/subscriptions/{urllib.parse.quote(subscription.id)}",
            role=ROLE_MAIL_READ, json_body={"expirationDateTime": _iso(expires)})
        renewed = _subscription(response.json())
        return Subscription(renewed.id, renewed.resource or subscription.resource,
                            renewed.expires_at, subscription.client_state)

    async def unsubscribe(self, subscription_id: str) -> None:
        await self.delete(f"/subscriptions/{urllib.parse.quote(subscription_id)}",
                          role=ROLE_MAIL_READ)

    def inbox_resource(self) -> str:
        return f"users/{self.user}/mailFolders('inbox')/messages"


async def renew_due(graph: GraphClient, subscriptions: Sequence[Subscription],
                    now: dt.datetime) -> AsyncIterator[Subscription]:
    """Renew each subscription that is due; yields the renewed ones (others untouched).

    A subscription Graph no longer knows (404) is created again for the same resource
    by the caller: this yields nothing for it and the caller sees it missing.
    """
    for subscription in subscriptions:
        if subscription.due(now):
            try:
                yield await graph.renew(subscription, now=now)
            except NotFound:
                continue


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _subscription(data: Mapping[str, Any]) -> Subscription:
    expires = dt.datetime.fromisoformat(str(data["expirationDateTime"]).replace("Z", "+00:00"))
    return Subscription(str(data["id"]), str(data.get("resource", "")), expires,
                        data.get("clientState"))


def notification_matches(body: bytes, client_state: str) -> list[Mapping[str, Any]]:
    """The notifications of a webhook POST that carry our clientState (others are forged)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    values = data.get("value", []) if isinstance(data, dict) else []
    return [n for n in values if isinstance(n, dict) and n.get("clientState") == client_state]


# ---------------------------------------------------------------- Test & Enable

async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions, *, transport: httpx.AsyncBaseTransport | None = None,
                ) -> ProbeResult:
    """Get a token and open what the channel needs; nothing is changed or sent."""
    async with GraphClient(profile, login, options, transport=transport) as graph:
        token = await graph.access_token()
        if channel is Channel.INCOMING:
            inbox = await graph.folder("inbox")
            found = f"Inbox ({inbox.get('totalItemCount', '?')} messages)"
        elif channel is Channel.OUTGOING:
            if token.roles is not None and token.roles and ROLE_MAIL_SEND not in token.roles:
                raise AuthError(
                    f"Graph: app {profile.client_id} has no {ROLE_MAIL_SEND} permission "
                    f"(the token grants {', '.join(sorted(token.roles))})",
                    fix=f"grant the application permission {ROLE_MAIL_SEND} with admin consent",
                    code="permission-missing")
            if token.scopes is not None and ROLE_MAIL_SEND not in token.scopes:
                raise AuthError(
                    f"Graph: {mailbox.address} has not consented to {ROLE_MAIL_SEND} "
                    f"(the token grants {', '.join(sorted(token.scopes)) or 'nothing'})",
                    fix="add the delegated permission Mail.Send to the app registration and "
                        f"run: serversync mailbox sign-in {mailbox.address}",
                    code="permission-missing")
            await graph.folder("sentitems", role=ROLE_MAIL_SEND)
            found = "Sent Items; sendMail permitted"
        else:
            await graph.request("GET", "/calendar", role=ROLE_CALENDARS,
                                params={"$select": "id"})
            await graph.request("GET", "/contacts", role=ROLE_CONTACTS,
                                params={"$top": "1", "$select": "id"})
            await graph.default_todo_list()
            found = "calendar, contacts and To Do tasks"
    if graph.delegated:
        return ProbeResult(f"Graph {graph.root}: {mailbox.address} with the user's own consent "
                           f"(delegated, app {profile.client_id}): {found}")
    how = f" with {graph.certificate().describe()}" if profile.client_certificate else ""
    return ProbeResult(f"Graph {graph.root}: {mailbox.address} as app {profile.client_id}"
                       f"{how}: {found}")


# ---------------------------------------------------------------- incoming mail source

_WELL_KNOWN = {"inbox": "inbox", "sent": "sentitems", "sent items": "sentitems",
               "sentitems": "sentitems", "archive": "archive"}


class GraphSource:
    """A mailbox's mail folders over Graph as a `protocols.MailSource`.

    The cursor is the delta query's link (``FolderCursor.token``): a nextLink while a round
    is under way, the deltaLink once it is complete, stored with the messages of its page.
    New messages are downloaded as MIME (``$value``) unless ``known`` already has them.
    """

    def __init__(self, profile: Profile, mailbox: Mailbox, login: Login,
                 options: ConnectOptions, *, tokens: TokenCache | None = None) -> None:
        self.mailbox = mailbox
        self.graph = GraphClient(profile, login, options, tokens=tokens)
        self._open = False

    async def open(self) -> None:
        await self.graph.__aenter__()
        self._open = True
        await self.graph.folder("inbox")  # token, permission and mailbox, before any work

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self.graph.__aexit__(None, None, None)

    async def resolve_folder(self, folder: str) -> str:
        name = _WELL_KNOWN.get(folder.strip().lower())
        return name if name is not None else await self.graph.folder_id(folder)

    async def fetch(self, folder: str, cursor: FolderCursor | None, *, batch_size: int,
                    known: KnownFilter) -> AsyncGenerator[FetchBatch, None]:
        name = await self.resolve_folder(folder)
        token = cursor.token if cursor is not None else None
        while True:
            try:
                page = await self.graph.mail_delta(name, token, page_size=batch_size)
            except StaleDelta:
                if token is None:
                    raise
                token = None  # a new round from the start; `known` skips what we have
                continue
            ids = [str(item["id"]) for item in page.changed]
            seen = await known(ids) if ids else set()
            messages: list[RemoteMessage] = []
            for message_id in ids:
                if message_id in seen:
                    continue
                try:
                    raw = await self.graph.mime(message_id)
                except NotFound:
                    continue  # gone between the listing and the read
                messages.append(RemoteMessage(folder, message_id, raw))
            yield FetchBatch(folder, messages, FolderCursor(token=page.cursor))
            token = page.cursor
            if not page.more:
                return

    async def finish(self, folder: str, dispositions: Sequence[Disposition]) -> None:
        for disposition in dispositions:
            path = f"/messages/{urllib.parse.quote(disposition.remote_id)}"
            if disposition.action == "flag":
                await self.graph.flag(disposition.remote_id)
            elif disposition.action == "move" and disposition.folder:
                target = await self.resolve_folder(disposition.folder)
                try:
                    await self.graph.move(disposition.remote_id, target)
                except NotFound:
                    continue
            elif disposition.action == "delete":
                await self.graph.delete(path, role=ROLE_MAIL_READ)


def source(profile: Profile, mailbox: Mailbox, login: Login,
           options: ConnectOptions) -> GraphSource:
    """The incoming source of an Exchange Online mailbox (`services.incoming` factory)."""
    return GraphSource(profile, mailbox, login, options)
