"""CalDAV and CardDAV (RFC 4791, RFC 6352, WebDAV RFC 4918) over httpx.

A user's collections live under their principal collection, ``{dav_url}/{user}/`` unless
``dav_url`` names another layout with a ``{user}`` placeholder. Own credentials log in as the
user; impersonation logs in as the service account, which the server's access rules allow
into every user's collections (Radicale's rights file, for instance). Delegation is refused
before we get here by the seed's rule.

`DavStore` is the `connectors.protocols.ItemStore` for CalDAV/CardDAV:

* discovery (RFC 6764 ``/.well-known/caldav`` and ``/.well-known/carddav`` for own logins,
  RFC 5397 ``current-user-principal``, RFC 4791 ``calendar-home-set``, RFC 6352
  ``addressbook-home-set``); an impersonating service account starts at the *user's*
  principal, since its own principal is not the user's. Missing collections are created
  (MKCALENDAR; extended MKCOL, RFC 5689, for address books); a user who never logged in
  gets their principal collection first (Radicale answers 409 otherwise);
* changes: RFC 6578 ``sync-collection`` with the stored token; a token the server rejects
  (``valid-sync-token``) restarts from an empty token; servers without it fall back to a
  Depth 1 PROPFIND of ``getetag`` (the caller diffs etags), skipped when the ``getctag``
  is unchanged;
* reads in bulk with ``calendar-multiget`` / ``addressbook-multiget``;
* writes guarded by ``If-None-Match: *`` (create) and ``If-Match`` (replace, delete).

Hrefs are compared decoded (Radicale percent-encodes the ``@`` of user names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import urllib.parse
from collections.abc import Sequence
from xml.etree.ElementTree import Element

import httpx
from defusedxml import ElementTree

from serversync.connectors import ical
from serversync.connectors.net import ConnectOptions, tls_context, translate
from serversync.connectors.protocols import (
    FetchedItem,
    ItemChanges,
    ItemCollection,
    PreconditionFailed,
    ProbeResult,
    WrittenItem,
)
from serversync.core.act import Contact, ItemKind, Record, content_hash
from serversync.core.errors import AuthError, ItemError, PermanentError, SyncError, TransientError
from serversync.core.model import AccessMode, Channel, Endpoint, Mailbox, Profile
from serversync.core.rules import Login

PROPFIND_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop>'
                 b"<D:resourcetype/><D:current-user-principal/></D:prop></D:propfind>")


def home_url(dav_url: str, user: str) -> str:
    """The URL of a user's principal collection."""
    quoted = urllib.parse.quote(user, safe="@")
    if "{user}" in dav_url:
        return dav_url.format(user=quoted)
    return dav_url.rstrip("/") + f"/{quoted}/"


def http_login(login: Login) -> tuple[str, str]:
    """HTTP has no authzid: impersonation is the service account's own login."""
    user = login.service if login.mode is AccessMode.IMPERSONATION and login.service else login.user
    return user, login.secret.reveal() if login.secret else ""


def client(profile: Profile, login: Login, options: ConnectOptions) -> httpx.AsyncClient:
    """An HTTP client that verifies TLS (system store + the profile's CA) and never follows
    redirects to other hosts silently."""
    # building a TLS context reads the system trust store (~25 ms): only for https
    verify = tls_context(options.ca_file) if (profile.dav_url or "").startswith("https") else True
    return httpx.AsyncClient(auth=http_login(login), timeout=options.timeout,
                             verify=verify, follow_redirects=False)


def endpoint_of(url: str) -> Endpoint:
    parts = urllib.parse.urlsplit(url)
    return Endpoint(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    assert profile.dav_url is not None
    url = home_url(profile.dav_url, login.target)
    user, _ = http_login(login)
    async with client(profile, login, options) as http:
        try:
            response = await http.request("PROPFIND", url, content=PROPFIND_BODY,
                                          headers={"Depth": "0",
                                                   "Content-Type": "application/xml"})
            created = False
            if response.status_code == 404 and login.mode is AccessMode.IMPERSONATION:
                # The user never logged in, so the server has no principal collection yet;
                # the service account creates it (Test & *Enable*).
                response = await http.request("MKCOL", url)
                created = response.status_code == 201
        except httpx.TransportError as exc:
            raise translate(exc.__cause__ or exc.__context__ or exc, endpoint_of(url),
                            "DAV") from exc
    status = response.status_code
    if status in (200, 207) or created:
        note = " (created the principal collection)" if created else ""
        return ProbeResult(f"DAV {url} as {login.mode.value} login {user}: reachable{note}")
    if status == 401:
        fix = ("update the profile's service_secret" if login.mode is AccessMode.IMPERSONATION
               else "update the mailbox's username and secret")
        raise AuthError(f"DAV at {url}: login of {user} was rejected (401)", fix=fix,
                        code="auth-failed")
    if status == 403:
        if login.mode is AccessMode.IMPERSONATION:
            raise AuthError(
                f"DAV at {url}: service account {user} has no rights on {login.target}'s "
                "collections (403)",
                fix="grant the service account read/write rights on every user's collections "
                    "(e.g. Radicale's rights file)", code="impersonation-refused")
        raise AuthError(f"DAV at {url}: {user} may not open these collections (403)",
                        fix="check the server's access rules for this user",
                        code="permission-denied")
    if status == 404:
        raise PermanentError(f"DAV at {url}: no such principal collection (404)",
                             fix="check dav_url on the profile and the user's name",
                             code="mailbox-not-found")
    if status in (429, 502, 503, 504):
        retry = response.headers.get("Retry-After")
        raise TransientError(f"DAV at {url}: server busy ({status})", code="server-busy",
                             retry_after=float(retry) if retry and retry.isdigit() else None)
    raise PermanentError(f"DAV at {url}: unexpected answer {status}", code="dav-error")


# ================================================================ the ItemStore

NS = {"D": "DAV:", "C": "urn:ietf:params:xml:ns:caldav", "A": "urn:ietf:params:xml:ns:carddav",
      "CS": "http://calendarserver.org/ns/"}
_XML = {"Content-Type": "application/xml; charset=utf-8"}
MULTIGET_BATCH = 250
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,120}$")

PROPFIND_HOMES = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" '
                  b'xmlns:C="urn:ietf:params:xml:ns:caldav" '
                  b'xmlns:A="urn:ietf:params:xml:ns:carddav"><D:prop><D:current-user-principal/>'
                  b"<C:calendar-home-set/><A:addressbook-home-set/></D:prop></D:propfind>")
PROPFIND_COLLECTIONS = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" '
                        b'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><D:resourcetype/>'
                        b"<D:displayname/><C:supported-calendar-component-set/>"
                        b"</D:prop></D:propfind>")
PROPFIND_ETAGS = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" '
                  b'xmlns:CS="http://calendarserver.org/ns/"><D:prop><D:resourcetype/>'
                  b"<D:getetag/><CS:getctag/></D:prop></D:propfind>")
PROPFIND_CTAG = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" '
                 b'xmlns:CS="http://calendarserver.org/ns/"><D:prop><CS:getctag/>'
                 b"</D:prop></D:propfind>")

# What we create when a user has no collection for a kind: (name, kinds, displayname).
DEFAULT_COLLECTIONS = {
    ItemKind.APPOINTMENT: ("calendar", "VEVENT", "Calendar"),
    ItemKind.TASK: ("tasks", "VTODO", "Tasks"),
    ItemKind.CONTACT: ("contacts", "", "Contacts"),
}
_COMPONENT_KIND = {"VEVENT": ItemKind.APPOINTMENT, "VTODO": ItemKind.TASK}


def _sync_body(token: str | None) -> bytes:
    tag = f"<D:sync-token>{_escape(token)}</D:sync-token>" if token else "<D:sync-token/>"
    return (f'<?xml version="1.0" encoding="utf-8"?><D:sync-collection xmlns:D="DAV:">{tag}'
            "<D:sync-level>1</D:sync-level><D:prop><D:getetag/></D:prop>"
            "</D:sync-collection>").encode()


def _multiget_body(vcard: bool, paths: Sequence[str]) -> bytes:
    hrefs = "".join(f"<D:href>{_escape(quote_path(p))}</D:href>" for p in paths)
    if vcard:
        return (f'<?xml version="1.0" encoding="utf-8"?><A:addressbook-multiget xmlns:D="DAV:" '
                f'xmlns:A="urn:ietf:params:xml:ns:carddav"><D:prop><D:getetag/><A:address-data/>'
                f"</D:prop>{hrefs}</A:addressbook-multiget>").encode()
    return (f'<?xml version="1.0" encoding="utf-8"?><C:calendar-multiget xmlns:D="DAV:" '
            f'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><D:getetag/><C:calendar-data/>'
            f"</D:prop>{hrefs}</C:calendar-multiget>").encode()


def _mkcalendar_body(components: str, name: str) -> bytes:
    comps = "".join(f'<C:comp name="{c}"/>' for c in components.split(","))
    return (f'<?xml version="1.0" encoding="utf-8"?><C:mkcalendar xmlns:D="DAV:" '
            f'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:set><D:prop>'
            f"<D:displayname>{_escape(name)}</D:displayname>"
            f"<C:supported-calendar-component-set>{comps}</C:supported-calendar-component-set>"
            f"</D:prop></D:set></C:mkcalendar>").encode()


def _mkcol_addressbook_body(name: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><D:mkcol xmlns:D="DAV:" '
            f'xmlns:A="urn:ietf:params:xml:ns:carddav"><D:set><D:prop><D:resourcetype>'
            f"<D:collection/><A:addressbook/></D:resourcetype>"
            f"<D:displayname>{_escape(name)}</D:displayname></D:prop></D:set></D:mkcol>").encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def path_of(href: str) -> str:
    """The decoded path of an href or URL: the form hrefs are compared and stored in."""
    return urllib.parse.unquote(urllib.parse.urlsplit(href).path)


def quote_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/@:+,;=~-._!$'()*")


def item_name(uid: str, vcard: bool) -> str:
    """A file name for a new item: the UID when it is a safe name, else its SHA-1."""
    stem = uid if _SAFE_NAME.match(uid) else hashlib.sha1(uid.encode()).hexdigest()  # noqa: S324
    return stem + (".vcf" if vcard else ".ics")


class _Response:
    """One ``D:response`` of a multistatus: href, status, and the props found (200 propstat)."""

    def __init__(self, element: Element) -> None:
        self.path = path_of(element.findtext("D:href", "", NS).strip())
        self.status = element.findtext("D:status", "", NS)
        self.props: dict[str, Element] = {}
        for propstat in element.findall("D:propstat", NS):
            if " 200 " not in propstat.findtext("D:status", "", NS) + " ":
                continue
            prop = propstat.find("D:prop", NS)
            for child in prop if prop is not None else ():
                self.props[child.tag] = child

    def text(self, tag: str) -> str:
        element = self.props.get(tag)
        return (element.text or "").strip() if element is not None else ""

    @property
    def gone(self) -> bool:
        return " 404 " in self.status + " "


def _leaf(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _tag(prefix: str, name: str) -> str:
    return f"{{{NS[prefix]}}}{name}"


def _multistatus(body: bytes, where: str) -> tuple[list[_Response], Element]:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise TransientError(f"DAV at {where}: the server sent malformed XML ({exc})",
                             code="dav-error") from exc
    return [_Response(e) for e in root.findall("D:response", NS)], root


class DavStore:
    """`ItemStore` over CalDAV and CardDAV for one mailbox (one user)."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions) -> None:
        assert profile.dav_url is not None
        self.profile = profile
        self.login = login
        self.options = options
        self.base = profile.dav_url
        parts = urllib.parse.urlsplit(profile.dav_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.principal = path_of(home_url(profile.dav_url, login.target))
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> DavStore:
        self._http = client(self.profile, self.login, self.options)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ------------------------------------------------------------ HTTP

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      ok: Sequence[int] = (200, 201, 204, 207)) -> httpx.Response:
        assert self._http is not None, "use DavStore as an async context manager"
        url = path if path.startswith(("http://", "https://")) else self.origin + quote_path(path)
        try:
            response = await self._http.request(method, url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise translate(exc.__cause__ or exc.__context__ or exc, endpoint_of(url),
                            "DAV") from exc
        if response.status_code not in ok:
            raise self._error(method, path, response)
        return response

    def _error(self, method: str, path: str, response: httpx.Response) -> SyncError:
        """The typed error for an unexpected answer (412 is `PreconditionFailed`)."""
        status = response.status_code
        where = f"DAV {method} {path}"
        user, _ = http_login(self.login)
        if status == 401:
            fix = ("update the profile's service_secret"
                   if self.login.mode is AccessMode.IMPERSONATION
                   else "update the mailbox's username and secret")
            return AuthError(f"{where}: login of {user} was rejected (401)", fix=fix)
        if status == 403 and self.login.mode is AccessMode.IMPERSONATION:
            return AuthError(f"{where}: service account {user} has no rights on "
                             f"{self.login.target}'s collections (403)",
                             fix="grant the service account read/write rights on every user's "
                                 "collections (e.g. Radicale's rights file)",
                             code="impersonation-refused")
        if status == 403:
            return AuthError(f"{where}: {user} may not do this (403)",
                             fix="check the server's access rules for this user",
                             code="permission-denied")
        if status == 412:
            return PreconditionFailed(f"{where}: the item changed on the server (412)",
                                      fix="nothing: the next sync reads the server's copy")
        if status in (408, 429) or status >= 500:
            retry = response.headers.get("Retry-After")
            return TransientError(f"{where}: server busy or failing ({status})", code="server-busy",
                                  retry_after=float(retry) if retry and retry.isdigit() else None)
        return PermanentError(f"{where}: unexpected answer {status}", code="dav-error",
                              fix="check dav_url on the profile and the server's log")

    async def propfind(self, path: str, body: bytes, depth: str) -> list[_Response]:
        response = await self.request("PROPFIND", path, body=body,
                                      headers={"Depth": depth, **_XML})
        return _multistatus(response.content, path)[0]

    # ------------------------------------------------------------ discovery

    async def homes(self) -> tuple[str, str]:
        """(calendar home, address book home) paths of the user."""
        start = self.principal
        if self.login.mode is AccessMode.OWN:
            # RFC 6764: the well-known URI leads to the context path, where the server names
            # the principal of our own login, which is the user's.
            try:
                context = "/.well-known/caldav"
                response = await self.request("PROPFIND", context, body=PROPFIND_HOMES,
                                              headers={"Depth": "0", **_XML},
                                              ok=(207, 301, 302, 307, 308))
                if response.is_redirect:
                    context = path_of(response.headers.get("Location", "/"))
                    response = await self.request("PROPFIND", context, body=PROPFIND_HOMES,
                                                  headers={"Depth": "0", **_XML}, ok=(207,))
                found = _multistatus(response.content, context)[0]
                principal = found[0].props.get(_tag("D", "current-user-principal")) \
                    if found else None
                href = principal.findtext("D:href", "", NS) if principal is not None else ""
                if href:
                    start = path_of(href)
            except (PermanentError, TransientError):
                pass  # no well-known URI or no principal reporting: use dav_url's layout
        try:
            found = await self.propfind(start, PROPFIND_HOMES, "0")
        except PermanentError as exc:
            if "404" not in exc.message:
                raise
            await self.request("MKCOL", start, ok=(201,))  # a user who never logged in
            found = await self.propfind(start, PROPFIND_HOMES, "0")

        def home(prefix: str, name: str) -> str:
            prop = found[0].props.get(_tag(prefix, name)) if found else None
            href = prop.findtext("D:href", "", NS) if prop is not None else ""
            return path_of(href) if href else start
        return home("C", "calendar-home-set"), home("A", "addressbook-home-set")

    async def collections(self, kinds: Sequence[ItemKind]) -> dict[ItemKind, ItemCollection]:
        calendar_home, book_home = await self.homes()
        found: list[ItemCollection] = []
        for home in dict.fromkeys((calendar_home, book_home)):
            for entry in await self.propfind(home, PROPFIND_COLLECTIONS, "1"):
                if entry.path.rstrip("/") == home.rstrip("/"):
                    continue
                rtype = entry.props.get(_tag("D", "resourcetype"))
                if rtype is None:
                    continue
                name = entry.text(_tag("D", "displayname"))
                if rtype.find("A:addressbook", NS) is not None:
                    found.append(ItemCollection(entry.path, frozenset({ItemKind.CONTACT}), name))
                elif rtype.find("C:calendar", NS) is not None:
                    comps = entry.props.get(_tag("C", "supported-calendar-component-set"))
                    names = {c.get("name", "").upper() for c in comps} if comps is not None \
                        else {"VEVENT", "VTODO"}
                    kinds_here = frozenset(_COMPONENT_KIND[n] for n in names if n in _COMPONENT_KIND)
                    if kinds_here:
                        found.append(ItemCollection(entry.path, kinds_here, name))
        out: dict[ItemKind, ItemCollection] = {}
        for kind in kinds:
            # prefer a collection for this kind alone, then our default name, then any
            candidates = [c for c in found if kind in c.kinds]
            candidates.sort(key=lambda c: (len(c.kinds) != 1,
                                           _leaf(c.href) != DEFAULT_COLLECTIONS[kind][0], c.href))
            out[kind] = candidates[0] if candidates else await self._create(
                kind, calendar_home if kind is not ItemKind.CONTACT else book_home)
        return out

    async def _create(self, kind: ItemKind, home: str) -> ItemCollection:
        name, components, display = DEFAULT_COLLECTIONS[kind]
        path = home.rstrip("/") + f"/{name}/"
        if kind is ItemKind.CONTACT:
            await self.request("MKCOL", path, body=_mkcol_addressbook_body(display),
                               headers=_XML, ok=(201,))
        else:
            await self.request("MKCALENDAR", path, body=_mkcalendar_body(components, display),
                               headers=_XML, ok=(201,))
        return ItemCollection(path, frozenset({kind}), display)

    # ------------------------------------------------------------ changes

    async def changes(self, collection: ItemCollection, token: str | None) -> ItemChanges:
        """Changes since ``token``: ``<ctag> <sync-token>`` for RFC 6578 servers (the ctag
        is checked first: a cheap Depth 0 PROPFIND that answers the common "nothing
        changed" without the REPORT), ``ctag:<ctag>`` for servers without RFC 6578."""
        if token and token.startswith("ctag:"):
            return await self._etag_listing(collection, token)
        ctag, _, sync_token = (token or "").rpartition(" ")
        entries = await self.propfind(collection.href, PROPFIND_CTAG, "0")
        # read before the REPORT: a change in between only costs one more REPORT next time
        now_ctag = entries[0].text(_tag("CS", "getctag")) if entries else ""
        if ctag and now_ctag == ctag:
            return ItemChanges(token, (), ())
        changes = await self._sync_collection(collection, sync_token or None)
        if changes.token and now_ctag and " " not in now_ctag and changes.token.find(" ") < 0:
            return dataclasses.replace(changes, token=f"{now_ctag} {changes.token}")
        return changes

    async def _sync_collection(self, collection: ItemCollection,
                               token: str | None) -> ItemChanges:
        response = await self.request("REPORT", collection.href, body=_sync_body(token),
                                      headers={"Depth": "0", **_XML},
                                      ok=(200, 207, 403, 409, 400, 501, 405, 415))
        if response.status_code in (403, 409) and b"valid-sync-token" in response.content:
            return await self._sync_collection(collection, None)  # expired: start over
        if response.status_code not in (200, 207):
            if response.status_code == 403 and self.login.mode is AccessMode.IMPERSONATION:
                raise self._error("REPORT", collection.href, response)
            return await self._etag_listing(collection, None)  # no RFC 6578 on this server
        entries, root = _multistatus(response.content, collection.href)
        new_token = root.findtext("D:sync-token", "", NS).strip() or None
        changed, deleted = [], []
        for entry in entries:
            if entry.path.rstrip("/") == collection.href.rstrip("/"):
                continue
            if entry.gone:
                deleted.append(entry.path)
            else:
                changed.append((entry.path, entry.text(_tag("D", "getetag"))))
        return ItemChanges(new_token, changed, deleted, complete=not token)

    async def _etag_listing(self, collection: ItemCollection, token: str | None) -> ItemChanges:
        """The fallback: every href and etag, unless the ctag says nothing changed."""
        ctag = ""
        if token:
            entries = await self.propfind(collection.href, PROPFIND_CTAG, "0")
            ctag = entries[0].text(_tag("CS", "getctag")) if entries else ""
            if ctag and token == f"ctag:{ctag}":
                return ItemChanges(token, (), ())
        changed = []
        for entry in await self.propfind(collection.href, PROPFIND_ETAGS, "1"):
            if entry.path.rstrip("/") == collection.href.rstrip("/"):
                ctag = entry.text(_tag("CS", "getctag")) or ctag
                continue
            changed.append((entry.path, entry.text(_tag("D", "getetag"))))
        # ctag read in the same PROPFIND as the etags: a write after it changes the ctag
        return ItemChanges(f"ctag:{ctag}" if ctag else None, changed, (), complete=True)

    # ------------------------------------------------------------ items

    async def get_many(self, collection: ItemCollection,
                       hrefs: Sequence[str]) -> list[FetchedItem]:
        vcard = ItemKind.CONTACT in collection.kinds
        data_tag = _tag("A", "address-data") if vcard else _tag("C", "calendar-data")
        out: list[FetchedItem] = []
        for i in range(0, len(hrefs), MULTIGET_BATCH):
            batch = list(hrefs[i:i + MULTIGET_BATCH])
            response = await self.request("REPORT", collection.href,
                                          body=_multiget_body(vcard, batch),
                                          headers={"Depth": "1", **_XML})
            entries, _ = _multistatus(response.content, collection.href)
            for entry in entries:
                if entry.gone or data_tag not in entry.props:
                    continue  # deleted between listing and reading: the next sync sees it
                raw = entry.text(data_tag).encode()
                record: Record | None = None
                problem = ""
                try:
                    record = ical.parse(raw, vcard=vcard)
                except ItemError as exc:
                    problem = exc.message
                out.append(FetchedItem(entry.path, entry.text(_tag("D", "getetag")), raw,
                                       record, problem))
        return out

    async def put(self, collection: ItemCollection, record: Record, *, href: str | None,
                  if_match: str | None, invitations: bool) -> WrittenItem:
        vcard = isinstance(record, Contact)
        path = href or collection.href.rstrip("/") + "/" + item_name(record.uid, vcard)
        data = ical.render(record, invitations=invitations)
        headers = {"Content-Type": "text/vcard; charset=utf-8" if vcard
                   else "text/calendar; charset=utf-8"}
        if href is None:
            headers["If-None-Match"] = "*"
        elif if_match:
            headers["If-Match"] = if_match
        response = await self.request("PUT", path, body=data, headers=headers, ok=(200, 201, 204))
        # the hash of what the server now holds, read back through the same parser the
        # next sync will use, so that our own write never looks like a server change
        written = ical.parse(data, vcard=vcard)
        return WrittenItem(path, response.headers.get("ETag"), content_hash(written))

    async def delete(self, href: str, *, if_match: str | None) -> None:
        headers = {"If-Match": if_match} if if_match else {}
        await self.request("DELETE", href, headers=headers, ok=(200, 204, 404))


def store(profile: Profile, login: Login, options: ConnectOptions) -> DavStore:
    """The factory `serversync.wiring` registers for DAV profiles."""
    return DavStore(profile, login, options)
