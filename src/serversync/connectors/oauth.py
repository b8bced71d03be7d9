"""OAuth 2.0 access tokens for server-to-server connectors (RFC 6749 §4.4, RFC 7523).

Three grants, each a form POST to a token endpoint over TLS:

* client credentials (RFC 6749 §4.4) — Microsoft identity platform app-only tokens for Graph,
  authenticated by a client secret or by a certificate's signed client assertion (RFC 7523
  §2.2, `connectors.certificates`);
* JWT bearer assertion (RFC 7523 §2.1) — a Google service account with domain-wide
  delegation, ``sub`` naming the user to act as (`connectors.gmail` signs the assertion);
* refresh token (RFC 6749 §6) — per-mailbox consent (3-legged OAuth).

Why not msal: it is synchronous, and before the first token it fetches the authority's
instance-discovery document from the public cloud, which a loopback test (and an air-gapped
sovereign-cloud install with an overridden ``token_url``) cannot allow. The client-credentials
request is one documented POST, so we send it with the same httpx client as the API calls.

Secrets travel only in POST bodies, never in URLs; tokens are `Secret` values, so they cannot
reach a log line or an error message. Failures are classified from the endpoint's documented
error codes (``AADSTS7000215`` invalid client secret, ``unauthorized_client`` for Google
delegation not granted, …) into typed errors that say what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from serversync.connectors.net import translate
from serversync.core.errors import AuthError, PermanentError, SyncError, TransientError
from serversync.core.model import Endpoint
from serversync.core.secret import Secret

EXPIRY_MARGIN_S = 120.0  # refresh this long before the token expires


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: Secret
    expires_at: float  # time.time() seconds
    claims: Mapping[str, Any] = field(default_factory=dict)  # unverified JWT payload, if any
    refresh_token: Secret | None = None  # a new refresh token, when the endpoint rotates it

    def fresh(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) < self.expires_at - EXPIRY_MARGIN_S

    @property
    def roles(self) -> frozenset[str] | None:
        """Application permissions in an app-only token (``roles``), when the token says."""
        roles = self.claims.get("roles")
        return frozenset(str(r) for r in roles) if isinstance(roles, list) else None

    @property
    def scopes(self) -> frozenset[str] | None:
        """Delegated permissions in a user's token (``scp``, space-separated), when it says."""
        scp = self.claims.get("scp")
        return frozenset(str(scp).split()) if isinstance(scp, str) else None


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: only used to read ``roles`` for better messages."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _endpoint(url: str) -> Endpoint:
    parsed = httpx.URL(url)
    return Endpoint(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))


# ---------------------------------------------------------------- error classification

# Microsoft identity platform error codes (AADSTS…), with what the administrator should do.
_AADSTS: dict[str, tuple[str, str]] = {
    "7000215": ("bad-client-secret", "the client secret is wrong: create a new secret in the "
                "app registration (Certificates & secrets) and update client_secret"),
    "7000222": ("client-secret-expired", "the client secret has expired: create a new secret "
                "in the app registration and update client_secret"),
    # Certificate credentials (client assertions).
    "700027": ("bad-client-certificate", "Microsoft could not verify the client assertion's "
               "signature with any certificate of the app registration: upload this "
               "certificate's public part there (Certificates & secrets → Certificates), or set "
               "client_certificate to a certificate and key that are registered"),
    "700024": ("client-assertion-expired", "the signed client assertion is outside its valid "
               "time range: serversync signs each one for 10 minutes from now, so this "
               "server's clock is wrong; synchronise it (NTP)"),
    "700023": ("client-assertion-audience", "the client assertion's audience is not this "
               "tenant's token endpoint: check tenant_id and token_url"),
    "700016": ("app-not-found", "no application with this client_id exists in the tenant: "
               "check client_id and tenant_id, and that admin consent was granted there"),
    "90002": ("tenant-not-found", "the tenant does not exist: check tenant_id"),
    "900023": ("tenant-not-found", "tenant_id is not a valid tenant id or domain"),
    "7000112": ("app-disabled", "the application is disabled in the tenant: re-enable it"),
    "50034": ("mailbox-not-found", "the user does not exist in the tenant"),
    "65001": ("consent-missing", "admin consent has not been granted for this application"),
}


def classify_token_error(status: int, body: bytes, *, what: str,
                         retry_after: float | None = None) -> SyncError:
    """A token endpoint's refusal as a typed error (RFC 6749 §5.2 plus vendor codes)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    error = str(data.get("error", ""))
    description = str(data.get("error_description", "")).split("\r\n", 1)[0]
    codes = [str(c) for c in data.get("error_codes", []) if c is not None]
    if not codes and description.startswith("AADSTS"):
        codes = [description[6:].split(":", 1)[0]]
    for code in codes:
        if code in _AADSTS:
            name, fix = _AADSTS[code]
            if code == "700027" and "expired" in description.lower():
                # "[Reason - The key used is expired.]": the registered certificate lapsed
                name, fix = "client-certificate-expired", (
                    "the certificate registered for the app has expired: upload a new "
                    "certificate to the app registration and update client_certificate")
            return AuthError(f"{what}: the token endpoint refused the app (AADSTS{code}: "
                             f"{error})", fix=fix, code=name)
    if status == 429 or status >= 500 or error == "temporarily_unavailable":
        return TransientError(f"{what}: token endpoint unavailable ({status})",
                              code="token-endpoint-busy", retry_after=retry_after)
    if error == "unauthorized_client":
        return AuthError(f"{what}: the client may not obtain this token ({description or error})",
                         fix="for a Google service account, authorize its client id for "
                             "https://mail.google.com/ in the Workspace admin console "
                             "(Security → API controls → Domain-wide delegation)",
                         code="delegation-not-granted")
    if error == "invalid_client":
        return AuthError(f"{what}: the client credentials were rejected ({error})",
                         fix="check client_id and client_secret (or client_certificate, or "
                             "the service account key)",
                         code="bad-client-secret")
    if error == "invalid_grant":
        lowered = description.lower()
        if "email" in lowered or "user" in lowered:
            return PermanentError(f"{what}: the user to act as is unknown ({description})",
                                  fix="check the mailbox address exists in the Workspace domain",
                                  code="mailbox-not-found")
        if "signature" in lowered or "jwt" in lowered:
            return AuthError(f"{what}: the signed assertion was rejected ({description})",
                             fix="check the service account's private key and client id",
                             code="bad-client-secret")
        return AuthError(f"{what}: the grant was rejected ({description or error})",
                         fix="the refresh token was revoked or expired: sign in again",
                         code="token-expired")
    if error == "invalid_scope":
        return PermanentError(f"{what}: scope refused ({description})",
                              fix="grant the application the permission it asks for",
                              code="permission-missing")
    return AuthError(f"{what}: token request refused ({status} {error})".rstrip(),
                     fix="check the app registration and its credentials", code="auth-failed")


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def post_form(http: httpx.AsyncClient, url: str, form: Mapping[str, str], *,
                    what: str) -> httpx.Response:
    """POST a form to an authorization server; a transport failure as a typed error."""
    try:
        return await http.post(url, data=dict(form), headers={"Accept": "application/json"})
    except httpx.TransportError as exc:
        raise translate(exc.__cause__ or exc.__context__ or exc, _endpoint(url), what) from None


def refusal(response: httpx.Response, *, what: str) -> SyncError:
    """A non-200 answer of an authorization server as a typed error."""
    return classify_token_error(response.status_code, response.content, what=what,
                                retry_after=retry_after(response))


async def request_token(http: httpx.AsyncClient, url: str, form: Mapping[str, str], *,
                        what: str) -> AccessToken:
    """POST ``form`` to the token endpoint; the answer as an `AccessToken`."""
    response = await post_form(http, url, form, what=what)
    if response.status_code != 200:
        raise refusal(response, what=what)
    return token_answer(response, what=what)


def token_answer(response: httpx.Response, *, what: str) -> AccessToken:
    """A token endpoint's 200 answer as an `AccessToken` (with a rotated refresh token)."""
    try:
        data = response.json()
        value = str(data["access_token"])
        lifetime = float(data.get("expires_in", 3600))
    except (ValueError, KeyError, TypeError):
        raise PermanentError(f"{what}: the token endpoint's answer has no access_token",
                             fix="check token_url", code="token-endpoint-invalid") from None
    rotated = data.get("refresh_token") if isinstance(data, dict) else None
    return AccessToken(Secret(value), time.time() + lifetime, jwt_claims(value),
                       Secret(str(rotated)) if rotated else None)


@dataclass(slots=True)
class _Rotation:
    base: Secret  # the stored refresh token this rotation started from
    newest: Secret
    saved: bool = False


class RefreshTokens:
    """The newest refresh token of each signed-in mailbox (delegated OAuth).

    Microsoft's token endpoint answers every refresh with a *new* refresh token, valid for
    90 days from then (a sliding window); the old one keeps working until its own 90 days
    end. Using and storing the newest one keeps a mailbox signed in for as long as it syncs.
    This process-wide record lets every connection in the process use the newest token at
    once; `services.consent` writes each one to the mailbox's encrypted secret after the run
    (compare-and-set, so a fresh sign-in by an administrator is never overwritten). A token
    stored by someone else (a new sign-in) wins over the rotation started from an older one.
    """

    def __init__(self) -> None:
        self._by_owner: dict[str, _Rotation] = {}

    def current(self, owner: str, stored: Secret | None) -> Secret | None:
        rotation = self._by_owner.get(owner)
        if rotation is None or stored is None:
            return stored
        if stored.reveal() in (rotation.base.reveal(), rotation.newest.reveal()):
            return rotation.newest
        del self._by_owner[owner]  # signed in again meanwhile: the stored token is newer
        return stored

    def rotated(self, owner: str, used: Secret, newest: Secret) -> None:
        rotation = self._by_owner.get(owner)
        base = rotation.base if rotation is not None and not rotation.saved else used
        self._by_owner[owner] = _Rotation(base, newest)

    def unsaved(self) -> dict[str, tuple[Secret, Secret]]:
        """owner → (the token stored when the rotation began, the newest one)."""
        return {owner: (r.base, r.newest) for owner, r in self._by_owner.items() if not r.saved}

    def saved(self, owner: str, newest: Secret) -> None:
        rotation = self._by_owner.get(owner)
        if rotation is not None and rotation.newest.reveal() == newest.reveal():
            rotation.saved, rotation.base = True, newest


REFRESH_TOKENS = RefreshTokens()


class TokenCache:
    """Tokens by (endpoint, client, scope, subject), refreshed before they expire.

    One lock per key, so concurrent mailboxes of one profile ask for one token at a time.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, ...], AccessToken] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    def forget(self, key: tuple[str, ...]) -> None:
        self._tokens.pop(key, None)

    async def get(self, key: tuple[str, ...], http: httpx.AsyncClient, url: str,
                  form: Mapping[str, str] | Callable[[], Mapping[str, str]], *,
                  what: str) -> AccessToken:
        """The cached token, or a new one. ``form`` may be a function, called only when a
        token is requested (a client assertion is signed per request, not per API call)."""
        token = self._tokens.get(key)
        if token is not None and token.fresh():
            return token
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            token = self._tokens.get(key)
            if token is None or not token.fresh():
                fields = form() if callable(form) else form
                token = await request_token(http, url, fields, what=what)
                self._tokens[key] = token
            return token


# ---------------------------------------------------------------- device authorization grant

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """A pending sign-in (RFC 8628 §3.2): the user opens ``verification_uri`` anywhere and
    types ``user_code``; this server never sees the user's password."""

    device_code: Secret
    user_code: str
    verification_uri: str
    message: str
    expires_at: float  # time.monotonic() seconds
    interval: float


async def start_device_sign_in(http: httpx.AsyncClient, url: str, client_id: str, scope: str,
                               *, what: str) -> DeviceCode:
    """Ask the authorization server for a device code (RFC 8628 §3.1)."""
    response = await post_form(http, url, {"client_id": client_id, "scope": scope}, what=what)
    if response.status_code != 200:
        raise refusal(response, what=what)
    try:
        data = response.json()
        return DeviceCode(
            Secret(str(data["device_code"])), str(data["user_code"]),
            str(data.get("verification_uri") or data["verification_url"]),
            str(data.get("message") or ""),
            time.monotonic() + float(data.get("expires_in", 900)),
            max(1.0, float(data.get("interval", 5))))
    except (ValueError, KeyError, TypeError):
        raise PermanentError(f"{what}: the device authorization answer is incomplete",
                             fix="check token_url (the device code endpoint is beside it)",
                             code="token-endpoint-invalid") from None


async def finish_device_sign_in(
        http: httpx.AsyncClient, url: str, client_id: str, code: DeviceCode, *, what: str,
        client_secret: Secret | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic) -> AccessToken:
    """Poll the token endpoint until the user has signed in (RFC 8628 §3.4–3.5).

    ``authorization_pending`` waits the server's interval, ``slow_down`` adds five seconds to
    it; a declined or expired sign-in is an `AuthError` that says to start again.
    """
    form = {"grant_type": DEVICE_CODE_GRANT, "client_id": client_id,
            "device_code": code.device_code.reveal()}
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
    interval = code.interval
    while True:
        if clock() >= code.expires_at:
            raise AuthError(f"{what}: the sign-in code {code.user_code} expired before the "
                            "user signed in", fix="start the sign-in again", code="sign-in-expired")
        await sleep(interval)
        response = await post_form(http, url, form, what=what)
        if response.status_code == 200:
            return token_answer(response, what=what)
        error = _error_name(response.content)
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5.0
            continue
        if error in ("authorization_declined", "access_denied"):
            raise AuthError(f"{what}: the user declined the sign-in",
                            fix="start the sign-in again and accept the permissions",
                            code="sign-in-declined")
        if error == "expired_token":
            raise AuthError(f"{what}: the sign-in code {code.user_code} expired",
                            fix="start the sign-in again", code="sign-in-expired")
        raise refusal(response, what=what)


def _error_name(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    return str(data.get("error", "")) if isinstance(data, dict) else ""
