"""CalDAV and CardDAV (RFC 4791, RFC 6352, WebDAV RFC 4918) over httpx.

A user's collections live under their principal collection, ``{dav_url}/{user}/`` unless
``dav_url`` names another layout with a ``{user}`` placeholder. Own credentials log in as the
user; impersonation logs in as the service account, which the server's access rules allow
into every user's collections (Radicale's rights file, for instance). Delegation is refused
before we get here by the seed's rule.
"""

from __future__ import annotations

import urllib.parse

import httpx

from serversync.connectors.net import ConnectOptions, tls_context, translate
from serversync.connectors.protocols import ProbeResult
from serversync.core.errors import AuthError, PermanentError, TransientError
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
    return httpx.AsyncClient(auth=http_login(login), timeout=options.timeout,
                             verify=tls_context(options.ca_file), follow_redirects=False)


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
