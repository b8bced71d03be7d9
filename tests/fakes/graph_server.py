"""A loopback Microsoft Graph (v1.0) and Microsoft identity platform token endpoint.

Implements what `serversync.connectors.graph` uses, in the shapes of Microsoft's Graph and
identity platform references (see ``tests/fixtures/graph/*.json``, each naming its page):

* ``POST /{tenant}/oauth2/v2.0/token`` — client credentials; a wrong secret answers
  ``invalid_client`` with ``AADSTS7000215``, an unknown app ``unauthorized_client`` with
  ``AADSTS700016``; tokens are JWT-shaped with the app's ``roles`` and can be expired.
  Certificate credentials (``client_assertion``): the assertion's ``x5t#S256`` must name a
  certificate registered for the app, its signature (PS256 or RS256) must verify with that
  certificate's key (checked by PyJWT, independently of our signing code) and its claims
  must be ``aud`` = this token endpoint, ``iss`` = ``sub`` = the client id, with ``jti``,
  ``nbf``, ``iat`` and ``exp``; refusals carry AADSTS700027 (unknown key, bad signature,
  expired registered certificate), AADSTS700024 (outside its time range, e.g. clock skew)
  and AADSTS700023 (audience);
* mail folders, ``messages/delta`` (nextLink/deltaLink, ``Prefer: odata.maxpagesize``),
  ``messages/{id}/$value``, ``sendMail`` (base64 MIME; the Sent Items copy carries the MIME's
  Message-ID as ``internetMessageId``), ``mailFolders/{id}/messages?$filter=internetMessageId
  eq '…'``, PATCH, move and DELETE;
* ``calendar``, ``calendarView/delta``, ``events`` with recurring series, their instances and
  occurrences (`tests.fakes.graph_calendar`); ``contacts`` and ``contacts/delta``;
  ``todo/lists`` and ``todo/lists/{id}/tasks(/delta)``; ETags with ``If-Match`` (412);
* ``/subscriptions`` create, renew (PATCH), reauthorize (``POST …/reauthorize``, 204) and
  delete, with the 4230-minute limit; with a ``validator`` set, creating one first runs the
  validation handshake against ``notificationUrl`` and ``lifecycleNotificationUrl`` (200,
  text/plain, the token echoed) and answers 400 ``ValidationError`` otherwise;
  `lifecycle_notification` builds the documented lifecycle payload of a subscription;
* errors: 401 ``InvalidAuthenticationToken``, 403 ``ErrorAccessDenied`` (role missing),
  404 ``MailboxNotEnabledForRESTAPI`` and ``ErrorInvalidUser``, 429 with ``Retry-After``,
  400 ``ErrorInvalidRecipients`` from ``sendMail``.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import email.utils
import hashlib
import itertools
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.fakes.graph_calendar import Calendar, check_task
from tests.fakes.loopback import LoopbackServer, Recorded, Reply

ROLES_ALL = frozenset({"Mail.ReadWrite", "Mail.Send", "Calendars.ReadWrite",
                       "Contacts.ReadWrite", "Tasks.ReadWrite.All"})
MAX_SUBSCRIPTION = dt.timedelta(minutes=4230)
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_CLAIMS = ("aud", "iss", "sub", "jti", "nbf", "exp", "iat")
CLOCK_SKEW_S = 300  # tolerance the fake allows on nbf/exp

# (url, validationToken) -> (status, content type, body) of the receiver's answer
Validator = Callable[[str, str], tuple[int, str, str]]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


DELEGATED_ALL = frozenset({"Mail.ReadWrite", "Mail.Send", "Calendars.ReadWrite",
                           "Contacts.ReadWrite", "Tasks.ReadWrite", "offline_access"})
GRAPH_SCOPE_PREFIX = "https://graph.microsoft.com/"


@dataclass
class App:
    client_id: str
    secret: str | None
    roles: set[str] = field(default_factory=lambda: set(ROLES_ALL))
    # keyCredentials: uploaded certificates (public part), by x5t#S256 thumbprint
    certificates: dict[str, x509.Certificate] = field(default_factory=dict)
    # delegated permissions the registration asks users for (requiredResourceAccess, Scope)
    delegated: set[str] = field(default_factory=lambda: set(DELEGATED_ALL))
    user: str | None = None  # set on the view of a delegated token: the signed-in user


def x5t_s256(certificate: x509.Certificate) -> str:
    der = certificate.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


@dataclass
class Collection:
    """Items with a change log, for delta queries (sequence, id, removed)."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[tuple[int, str, bool]] = field(default_factory=list)


@dataclass
class User:
    address: str
    licensed: bool = True
    collections: dict[str, Collection] = field(default_factory=dict)
    mime: dict[str, bytes] = field(default_factory=dict)

    def collection(self, name: str) -> Collection:
        return self.collections.setdefault(name, Collection())


@dataclass
class DeviceSignIn:
    """A pending device authorization (RFC 8628) and what the user did with it."""

    client_id: str
    scopes: frozenset[str]
    user_code: str
    user: str | None = None
    declined: bool = False


class GraphServer:
    def __init__(self, tenant: str = "contoso-tenant") -> None:
        self.tenant = tenant
        self.apps: dict[str, App] = {}
        self.users: dict[str, User] = {}
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (client id, expiry)
        self.delegated: dict[str, tuple[str, frozenset[str]]] = {}  # token -> (user, scp)
        # refresh token -> (client id, user, scopes); old ones stay valid after rotation
        self.refresh_tokens: dict[str, tuple[str, str, frozenset[str]]] = {}
        self.refresh_uses: list[str] = []  # refresh tokens presented, in order
        self.device_sign_ins: dict[str, DeviceSignIn] = {}  # by device code
        self.throttle: list[float] = []  # Retry-After values for the next API requests
        # the same, for the next requests whose path ends with a name (e.g. "sendMail")
        self.throttle_for: dict[str, list[float]] = {}
        self.invalid_recipients: set[str] = set()  # sendMail to these: ErrorInvalidRecipients
        self.token_lifetime = 3600
        self.clock_skew = 0.0  # seconds the token endpoint's clock is ahead of ours
        # verified client assertions: (header, claims), in arrival order
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.calendar = Calendar(self)  # events, series and occurrences
        self.validator: Validator | None = None  # set: validate URLs on subscription creation
        self.validations: list[tuple[str, str]] = []  # (url, token) asked
        self.reauthorized: list[str] = []  # subscription ids, in order
        self.sent: list[tuple[str, bytes]] = []
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self.http = LoopbackServer(self.handle)

    # ------------------------------------------------------------ set-up helpers

    @property
    def requests(self) -> list[Recorded]:
        return self.http.requests

    @property
    def api_url(self) -> str:
        return f"{self.http.base_url}/v1.0"

    @property
    def token_url(self) -> str:
        return f"{self.http.base_url}/{self.tenant}/oauth2/v2.0/token"

    def start(self) -> GraphServer:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()

    def add_app(self, client_id: str, secret: str | None,
                roles: set[str] | None = None) -> App:
        app = App(client_id, secret, set(ROLES_ALL) if roles is None else roles)
        self.apps[client_id] = app
        return app

    def register_certificate(self, client_id: str, certificate: x509.Certificate) -> str:
        """Upload a certificate's public part to the app (Certificates & secrets)."""
        thumbprint = x5t_s256(certificate)
        self.apps[client_id].certificates[thumbprint] = certificate
        return thumbprint

    def add_user(self, address: str, *, licensed: bool = True) -> User:
        user = self.users.setdefault(address, User(address, licensed))
        for name in ("inbox", "sentitems", "events", "contacts"):
            user.collection(name)
        user.collection("todo:tasks-default")
        return user

    def lifecycle_notification(self, subscription_id: str, event: str) -> dict[str, Any]:
        """The lifecycle notification Graph posts to the subscription's lifecycle URL
        (``tests/fixtures/graph/lifecycle-*.json``)."""
        sub = self.subscriptions[subscription_id]
        return {"value": [{"subscriptionId": subscription_id,
                           "subscriptionExpirationDateTime": sub["expirationDateTime"],
                           "tenantId": self.tenant, "clientState": sub["clientState"],
                           "lifecycleEvent": event}]}

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens = {t: (c, 0.0) for t, (c, _) in self.tokens.items()}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    def put(self, address: str, collection: str, item: dict[str, Any],
            item_id: str | None = None) -> dict[str, Any]:
        """Create or replace an item (as a user editing in Outlook would); bumps its ETag."""
        with self._lock:
            coll = self.users[address].collection(collection)
            item_id = item_id or item.get("id") or self._new_id(collection[:3].upper())
            old = coll.items.get(item_id, {})
            version = int(str(old.get("changeKey", "CK0"))[2:]) + 1
            stored = {**old, **item, "id": item_id, "changeKey": f"CK{version}",
                      "@odata.etag": f'W/"CK{version}"'}
            coll.items[item_id] = stored
            coll.log.append((next(self._seq), item_id, False))
            return dict(stored)

    def remove(self, address: str, collection: str, item_id: str) -> None:
        with self._lock:
            coll = self.users[address].collection(collection)
            del coll.items[item_id]
            coll.log.append((next(self._seq), item_id, True))

    def deliver(self, address: str, mime: bytes, subject: str = "",
                folder: str = "inbox") -> str:
        with self._lock:
            item = self.put(address, folder, {
                "subject": subject, "internetMessageId": f"<m{next(self._ids)}@graph.test>",
                "receivedDateTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "parentFolderId": folder})
            self.users[address].mime[item["id"]] = mime
            return str(item["id"])

    # ------------------------------------------------------------ HTTP

    def handle(self, request: Recorded) -> Reply:
        with self._lock:
            path, _, query = request.path.partition("?")
            params = dict(urllib.parse.parse_qsl(query))
            if path == f"/{self.tenant}/oauth2/v2.0/token" and request.method == "POST":
                return self._token(request)
            if path == f"/{self.tenant}/oauth2/v2.0/devicecode" and request.method == "POST":
                return self._device_code(request)
            if not path.startswith("/v1.0/"):
                return _json(404, _err("NotFound", "no such endpoint"))
            app = self._bearer(request)
            if isinstance(app, Reply):
                return app
            named = self.throttle_for.get(path.rpartition("/")[2])
            if self.throttle or named:
                wait = (named or self.throttle).pop(0)
                return _json(429, _err("ApplicationThrottled", "Application is over its "
                                       "MailboxConcurrency limit."),
                             {"Retry-After": str(int(wait) if wait == int(wait) else wait)})
            parts = [urllib.parse.unquote(p) for p in path[len("/v1.0/"):].split("/")]
            if parts[0] == "subscriptions":
                return self._subscriptions(request, app, parts[1:])
            if parts[0] != "users" or len(parts) < 3:
                return _json(400, _err("BadRequest", "unsupported path"))
            if app.user is not None and parts[1].lower() != app.user:
                # a delegated token reaches only its own user's mailbox (no shared access here)
                return _json(403, _err("ErrorAccessDenied", "Access is denied. Check "
                                                            "credentials and try again."))
            user = self.users.get(parts[1].lower())
            if user is None:
                return _json(404, _err("ErrorInvalidUser",
                                       f"The requested user '{parts[1]}' is invalid."))
            if not user.licensed:
                return _json(404, _err("MailboxNotEnabledForRESTAPI",
                                       "The mailbox is either inactive, soft-deleted, or is "
                                       "hosted on-premise."))
            return self._user(request, app, user, parts[2:], params)

    def _token(self, request: Recorded) -> Reply:
        form = dict(urllib.parse.parse_qsl(request.body.decode()))
        app = self.apps.get(form.get("client_id", ""))
        grant = form.get("grant_type")
        if grant in ("refresh_token", "urn:ietf:params:oauth:grant-type:device_code"):
            return self._delegated_token(app, form)
        if grant != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type"})
        if app is None:
            return _json(400, {"error": "unauthorized_client", "error_codes": [700016],
                               "error_description": "AADSTS700016: Application with "
                               f"identifier '{form.get('client_id')}' was not found in the "
                               f"directory '{self.tenant}'."})
        if "client_assertion" in form or "client_assertion_type" in form:
            refused = self._check_assertion(app, form)
            if refused is not None:
                return refused
        elif app.secret is None or form.get("client_secret") != app.secret:
            return _json(401, {"error": "invalid_client", "error_codes": [7000215],
                               "error_description": "AADSTS7000215: Invalid client secret "
                               "provided. Ensure the secret being sent in the request is the "
                               "client secret value, not the client secret ID."})
        if form.get("scope") != "https://graph.microsoft.com/.default":
            return _json(400, {"error": "invalid_scope", "error_codes": [1002012]})
        expires = time.time() + self.token_lifetime
        token = ".".join([_b64({"typ": "JWT", "alg": "none"}),
                          _b64({"aud": "https://graph.microsoft.com", "appid": app.client_id,
                                "roles": sorted(app.roles), "tid": self.tenant,
                                "exp": int(expires), "n": next(self._ids)}), "sig"])
        self.tokens[token] = (app.client_id, expires)
        return _json(200, {"token_type": "Bearer", "expires_in": self.token_lifetime,
                           "ext_expires_in": self.token_lifetime, "access_token": token})

    # ------------------------------------------------------------ delegated (user) tokens

    def approve(self, user_code: str, address: str) -> None:
        """The user signs in on Microsoft's page and accepts the permissions."""
        with self._lock:
            pending = next(s for s in self.device_sign_ins.values() if s.user_code == user_code)
            pending.user = address.lower()

    def decline(self, user_code: str) -> None:
        with self._lock:
            next(s for s in self.device_sign_ins.values()
                 if s.user_code == user_code).declined = True

    def revoke(self, address: str) -> None:
        """Revoke every refresh token of a user (password reset, admin sign-out)."""
        with self._lock:
            self.refresh_tokens = {t: v for t, v in self.refresh_tokens.items()
                                   if v[1] != address.lower()}

    def _scopes(self, app: App, text: str) -> frozenset[str]:
        asked = {s.removeprefix(GRAPH_SCOPE_PREFIX) for s in text.split()}
        return frozenset(asked & app.delegated)

    def _device_code(self, request: Recorded) -> Reply:
        # https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code
        form = dict(urllib.parse.parse_qsl(request.body.decode()))
        app = self.apps.get(form.get("client_id", ""))
        if app is None:
            return _json(400, {"error": "unauthorized_client", "error_codes": [700016]})
        device_code = f"DAQABAAEAAA-{next(self._ids)}"
        user_code = f"F{next(self._ids):07d}"
        self.device_sign_ins[device_code] = DeviceSignIn(
            app.client_id, self._scopes(app, form.get("scope", "")), user_code)
        return _json(200, {
            "user_code": user_code, "device_code": device_code,
            "verification_uri": "https://microsoft.com/devicelogin", "expires_in": 900,
            "interval": 1, "message": "To sign in, use a web browser to open the page "
            f"https://microsoft.com/devicelogin and enter the code {user_code} to "
            "authenticate."})

    def _delegated_token(self, app: App | None, form: dict[str, str]) -> Reply:
        if app is None:
            return _json(400, {"error": "unauthorized_client", "error_codes": [700016]})
        if app.secret is not None and form.get("client_secret") != app.secret:
            return _json(401, {"error": "invalid_client", "error_codes": [7000215],
                               "error_description": "AADSTS7000215: Invalid client secret "
                               "provided."})
        if form["grant_type"] == "refresh_token":
            presented = form.get("refresh_token", "")
            self.refresh_uses.append(presented)
            entry = self.refresh_tokens.get(presented)
            if entry is None or entry[0] != app.client_id:
                return _json(400, {"error": "invalid_grant", "error_codes": [700082],
                                   "error_description": "AADSTS700082: The refresh token has "
                                   "expired due to inactivity."})
            _, user, scopes = entry
        else:
            pending = self.device_sign_ins.get(form.get("device_code", ""))
            if pending is None:
                return _json(400, {"error": "expired_token", "error_codes": [70020]})
            if pending.declined:
                return _json(400, {"error": "authorization_declined", "error_codes": [70000]})
            if pending.user is None:
                return _json(400, {"error": "authorization_pending", "error_codes": [70016]})
            del self.device_sign_ins[form["device_code"]]
            user, scopes = pending.user, pending.scopes
        expires = time.time() + self.token_lifetime
        graph_scopes = frozenset(scopes - {"offline_access"})
        token = ".".join([_b64({"typ": "JWT", "alg": "none"}),
                          _b64({"aud": "https://graph.microsoft.com", "appid": app.client_id,
                                "scp": " ".join(sorted(graph_scopes)), "upn": user,
                                "tid": self.tenant, "exp": int(expires),
                                "n": next(self._ids)}), "sig"])
        self.tokens[token] = (app.client_id, expires)
        self.delegated[token] = (user, graph_scopes)
        answer: dict[str, Any] = {"token_type": "Bearer", "expires_in": self.token_lifetime,
                                  "scope": " ".join(sorted(scopes)), "access_token": token}
        if "offline_access" in scopes:
            refresh = f"0.AAAA-rt-{next(self._ids)}"
            self.refresh_tokens[refresh] = (app.client_id, user, scopes)
            answer["refresh_token"] = refresh
        return _json(200, answer)

    def _check_assertion(self, app: App, form: dict[str, str]) -> Reply | None:
        """Verify a certificate credential as the identity platform documents it."""
        def refuse(code: int, text: str, status: int = 401,
                   error: str = "invalid_client") -> Reply:
            return _json(status, {"error": error, "error_codes": [code],
                                  "error_description": f"AADSTS{code}: {text}\r\nTrace ID: "
                                  "fake\r\nCorrelation ID: fake\r\nTimestamp: fake"})
        if "client_secret" in form:
            return _json(400, {"error": "invalid_request", "error_description":
                               "only one client credential may be presented"})
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            return _json(400, {"error": "invalid_request", "error_description":
                               "client_assertion_type must be " + CLIENT_ASSERTION_TYPE})
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.DecodeError:
            return refuse(50027, "JWT token is invalid or malformed.", 400, "invalid_request")
        thumbprint = str(header.get("x5t#S256", ""))
        certificate = app.certificates.get(thumbprint)
        if certificate is None:
            return refuse(700027, "Client assertion contains an invalid signature. [Reason - "
                          f"The key was not found., Thumbprint of key used by client: "
                          f"'{thumbprint}']")
        now = time.time() + self.clock_skew
        if certificate.not_valid_after_utc.timestamp() <= now:
            return refuse(700027, "Client assertion contains an invalid signature. [Reason - "
                          f"The key used is expired., Thumbprint of key used by client: "
                          f"'{thumbprint}']")
        try:
            claims = jwt.decode(assertion, certificate.public_key(),
                                algorithms=["PS256", "RS256"], audience=self.token_url,
                                options={"require": list(ASSERTION_CLAIMS),
                                         "verify_exp": False, "verify_nbf": False,
                                         "verify_iat": False})
        except jwt.InvalidSignatureError:
            return refuse(700027, "Client assertion failed signature validation.")
        except jwt.InvalidAudienceError:
            return refuse(700023, "Client assertion audience claim does not match Realm "
                          "issuer.")
        except jwt.InvalidTokenError as exc:
            return refuse(50027, f"JWT token is invalid or malformed ({exc}).", 400,
                          "invalid_request")
        if claims["iss"] != app.client_id or claims["sub"] != app.client_id:
            return refuse(700021, "Client assertion application identifier doesn't match "
                          "'client_id' parameter.")
        if not claims["nbf"] - CLOCK_SKEW_S <= now < claims["exp"] + CLOCK_SKEW_S:
            return refuse(700024, "Client assertion is not within its valid time range. "
                          f"Current time: {_stamp(now)}, assertion valid from "
                          f"{_stamp(claims['nbf'])}, expiry time of assertion "
                          f"{_stamp(claims['exp'])}.")
        self.assertions.append((header, claims))
        return None

    def _bearer(self, request: Recorded) -> App | Reply:
        header = request.headers.get("authorization", "")
        entry = self.tokens.get(header[7:]) if header.startswith("Bearer ") else None
        if entry is None:
            return _json(401, _err("InvalidAuthenticationToken", "Access token is empty."))
        client_id, expires = entry
        if expires < time.time():
            return _json(401, _err("InvalidAuthenticationToken",
                                   "Lifetime validation failed, the token is expired."))
        delegated = self.delegated.get(header[7:])
        if delegated is not None:  # the user's permissions, for the user's mailbox only
            user, scopes = delegated
            return App(client_id, None, roles=set(scopes), user=user)
        return self.apps[client_id]

    def _need(self, app: App, *roles: str) -> Reply | None:
        if app.roles & set(roles):
            return None
        return _json(403, _err("ErrorAccessDenied", "Access is denied. Check credentials and "
                                                    "try again."))

    # ------------------------------------------------------------ users/{id}/...

    def _user(self, request: Recorded, app: App, user: User, parts: list[str],
              params: dict[str, str]) -> Reply:
        method = request.method
        head = parts[0]
        read_mail = ("Mail.ReadWrite", "Mail.Read")
        if head == "mailFolders":
            denied = self._need(app, *read_mail)
            if denied:
                return denied
            if len(parts) == 1:
                wanted = params.get("$filter", "").partition("eq ")[2].strip("'")
                found = [{"id": n, "displayName": n} for n in user.collections
                         if n.lower() == wanted.lower()]
                return _json(200, {"value": found})
            folder = parts[1].lower()
            if folder not in user.collections or folder.startswith(("todo:", "events",
                                                                    "contacts")):
                return _json(404, _err("ErrorItemNotFound", "The specified object was not "
                                                            "found in the store."))
            if len(parts) == 2:
                return _json(200, {"id": folder, "displayName": folder.capitalize(),
                                   "totalItemCount": len(user.collection(folder).items)})
            if parts[2:] == ["messages"] and method == "GET":
                field_name, _, value = params.get("$filter", "").partition(" eq ")
                if field_name != "internetMessageId" or len(value) < 2 or \
                        not value.startswith("'") or not value.endswith("'"):
                    return _json(400, _err("BadRequest", "only $filter=internetMessageId eq "
                                                         "'…' is implemented by the fake"))
                wanted = value[1:-1].replace("''", "'")
                found = [_message_view(i) for i in user.collection(folder).items.values()
                         if i.get("internetMessageId") == wanted]
                return _json(200, {"value": found})
            if parts[2:] == ["messages", "delta"]:
                return self._delta(request, user.collection(folder), params, _message_view)
        if head == "sendMail" and method == "POST":
            denied = self._need(app, "Mail.Send")
            if denied:
                return denied
            if request.headers.get("content-type", "").split(";")[0] != "text/plain":
                return _json(400, _err("ErrorMimeContentInvalid", "expected base64 MIME"))
            mime = base64.b64decode(request.body)
            header = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                mime)
            listed = {a.lower() for _, a in email.utils.getaddresses(
                [str(v) for f in ("To", "Cc", "Bcc") for v in header.get_all(f) or []])}
            if listed & self.invalid_recipients:
                return _json(400, _err("ErrorInvalidRecipients",
                                       "At least one recipient is not valid., Recipient '"
                                       f"{sorted(listed & self.invalid_recipients)[0]}' is not "
                                       "resolved. All recipients must be resolved before a "
                                       "message can be submitted."))
            self.sent.append((user.address, mime))
            item = self.put(user.address, "sentitems", {
                "subject": str(header["Subject"] or ""), "isDraft": False,
                "internetMessageId": str(header["Message-ID"] or "").strip()})
            user.mime[item["id"]] = mime
            return Reply(202)
        if head == "messages" and len(parts) >= 2:
            denied = self._need(app, *read_mail)
            if denied:
                return denied
            found = next(((n, c) for n, c in user.collections.items() if parts[1] in c.items),
                         None)
            if found is None:
                return _json(404, _err("ErrorItemNotFound", "The specified object was not "
                                                            "found in the store."))
            name, coll = found
            if len(parts) == 3 and parts[2] == "$value" and method == "GET":
                return Reply(200, user.mime[parts[1]], {"Content-Type": "text/plain"})
            if len(parts) == 2 and method == "PATCH":
                return _json(200, _message_view(self.put(user.address, name,
                                                         json.loads(request.body), parts[1])))
            if len(parts) == 2 and method == "DELETE":
                self.remove(user.address, name, parts[1])
                return Reply(204)
            if len(parts) == 3 and parts[2] == "move" and method == "POST":
                target = str(json.loads(request.body)["destinationId"]).lower()
                item = coll.items[parts[1]]
                self.remove(user.address, name, parts[1])
                moved = self.put(user.address, target, {**item, "parentFolderId": target},
                                 parts[1])
                return _json(201, _message_view(moved))
        if head == "calendar" and len(parts) == 1:
            return self._need(app, "Calendars.ReadWrite") or _json(
                200, {"id": "calendar", "name": "Calendar"})
        if head == "calendarView" and parts[1:] == ["delta"]:
            denied = self._need(app, "Calendars.ReadWrite")
            if denied:
                return denied
            if "$deltatoken" not in params and "$skiptoken" not in params and not (
                    "startDateTime" in params and "endDateTime" in params):
                return _json(400, _err("ErrorInvalidParameter",
                                       "startDateTime and endDateTime are required"))
            return self._delta(request, user.collection("events"), params,
                               lambda item: self.calendar.view(item, None))
        if head == "events" and parts[1:] != ["delta"]:
            denied = self._need(app, "Calendars.ReadWrite")
            return denied or self.calendar.handle(request, user, parts[1:], params)
        if head in ("events", "contacts"):
            role = "Calendars.ReadWrite" if head == "events" else "Contacts.ReadWrite"
            denied = self._need(app, role)
            if denied:
                return denied
            if parts[1:] == ["delta"]:
                return self._delta(request, user.collection(head), params, dict)
            return self._crud(request, user, head, parts[1:], params)
        if head == "todo" and len(parts) >= 2 and parts[1] == "lists":
            denied = self._need(app, "Tasks.ReadWrite.All", "Tasks.ReadWrite")
            if denied:
                return denied
            if len(parts) == 2:
                return _json(200, {"value": [{"id": "tasks-default", "displayName": "Tasks",
                                              "wellknownListName": "defaultList"}]})
            collection = f"todo:{parts[2]}"
            if collection not in user.collections:
                return _json(404, _err("ErrorItemNotFound", "list not found"))
            if parts[3:] == ["tasks", "delta"]:
                return self._delta(request, user.collection(collection), params, dict)
            if len(parts) >= 4 and parts[3] == "tasks":
                refused = check_task(request, user.collection(collection).items.get(parts[4])
                                     if len(parts) == 5 else None)
                return refused or self._crud(request, user, collection, parts[4:], params)
        return _json(400, _err("BadRequest", f"unsupported: {method} {'/'.join(parts)}"))

    def _crud(self, request: Recorded, user: User, collection: str, rest: list[str],
              params: dict[str, str]) -> Reply:
        coll = user.collection(collection)
        method = request.method
        if not rest:
            if method == "POST":
                return _json(201, self.put(user.address, collection, json.loads(request.body)))
            top = int(params.get("$top", "100"))
            return _json(200, {"value": list(coll.items.values())[:top]})
        item_id = rest[0]
        item = coll.items.get(item_id)
        if item is None:
            return _json(404, _err("ErrorItemNotFound", "The specified object was not found "
                                                        "in the store."))
        if rest[1:] == ["extensions"] and method == "POST":
            # open extensions (To Do tasks): stored on the item, returned with $expand
            extension = {**json.loads(request.body), "id": json.loads(request.body)
                         .get("extensionName")}
            item.setdefault("extensions", []).append(extension)
            return _json(201, extension)
        match = request.headers.get("if-match")
        if match and match != item["@odata.etag"]:
            return _json(412, _err("ErrorIrresolvableConflict", "The change key passed in "
                                   "the request does not match the current change key for the "
                                   "item."))
        if method == "GET":
            return _json(200, item)
        if method == "PATCH":
            return _json(200, self.put(user.address, collection, json.loads(request.body),
                                       item_id))
        if method == "DELETE":
            self.remove(user.address, collection, item_id)
            return Reply(204)
        return _json(405, _err("MethodNotAllowed", method))

    def _delta(self, request: Recorded, coll: Collection, params: dict[str, str],
               view: Any) -> Reply:
        prefer = request.headers.get("prefer", "")
        size = int(prefer.partition("odata.maxpagesize=")[2] or 10)
        path = request.path.partition("?")[0]
        if "$deltatoken" in params or "$skiptoken" in params:
            token = params.get("$deltatoken") or params["$skiptoken"]
            try:
                since = int(token.partition("-")[0])
                initial = token.endswith("-i")
            except ValueError:
                return _json(410, _err("SyncStateNotFound", "The sync state is invalid."))
        else:
            since, initial = 0, True
        pending = [entry for entry in coll.log if entry[0] > since]
        if initial:
            # A first round lists what is there now, not the history; its pages carry "-i".
            latest: dict[str, int] = {}
            for seq, item_id, removed in pending:
                if removed:
                    latest.pop(item_id, None)
                else:
                    latest[item_id] = seq
            pending = sorted(((s, i, False) for i, s in latest.items()))
        page, rest = pending[:size], pending[size:]
        values: list[dict[str, Any]] = []
        for _seq, item_id, removed in page:
            if removed or item_id not in coll.items:
                values.append({"id": item_id, "@removed": {"reason": "deleted"}})
            else:
                values.append(view(coll.items[item_id]))
        base = self.http.base_url + path
        if rest:
            last = page[-1][0]
            link = {"@odata.nextLink": f"{base}?$skiptoken={last}{'-i' if initial else ''}"}
        else:
            last = coll.log[-1][0] if coll.log else 0
            link = {"@odata.deltaLink": f"{base}?$deltatoken={last}"}
        return _json(200, {"@odata.context": "fake", "value": values, **link})

    # ------------------------------------------------------------ subscriptions

    def _subscriptions(self, request: Recorded, app: App, rest: list[str]) -> Reply:
        now = dt.datetime.now(dt.UTC)
        if request.method == "POST" and not rest:
            body = json.loads(request.body)
            expires = dt.datetime.fromisoformat(body["expirationDateTime"].replace("Z", "+00:00"))
            if expires - now > MAX_SUBSCRIPTION:
                return _json(400, _err("ExtensionError", "Subscription expiration can only "
                                       "be 4230 minutes in the future."))
            resource = str(body["resource"])
            address = resource.split("/")[1].lower() if resource.startswith("users/") else ""
            if address not in self.users:
                return _json(404, _err("ErrorInvalidUser", f"The requested user "
                                                           f"'{address}' is invalid."))
            urls = [body["notificationUrl"]]
            if body.get("lifecycleNotificationUrl"):
                urls.append(body["lifecycleNotificationUrl"])
            for url in urls if self.validator is not None else ():
                failed = self._validate(url)
                if failed is not None:
                    return failed
            sub = {"id": self._new_id("SUB-"), "resource": resource,
                   "changeType": body["changeType"], "clientState": body.get("clientState"),
                   "notificationUrl": body["notificationUrl"],
                   "lifecycleNotificationUrl": body.get("lifecycleNotificationUrl"),
                   "expirationDateTime": body["expirationDateTime"],
                   "applicationId": app.client_id}
            self.subscriptions[sub["id"]] = sub
            return _json(201, sub)
        if len(rest) == 2 and rest[1] == "reauthorize" and request.method == "POST" \
                and rest[0] in self.subscriptions:
            denied = self._need(app, "Mail.ReadWrite", "Mail.Read")
            if denied:
                return denied
            if request.body:
                return _json(400, _err("BadRequest", "reauthorize takes no request body"))
            self.reauthorized.append(rest[0])
            return Reply(204)
        if len(rest) == 1 and rest[0] in self.subscriptions:
            sub = self.subscriptions[rest[0]]
            if request.method == "PATCH":
                body = json.loads(request.body)
                sub["expirationDateTime"] = body["expirationDateTime"]
                return _json(200, sub)
            if request.method == "DELETE":
                del self.subscriptions[rest[0]]
                return Reply(204)
        return _json(404, _err("ResourceNotFound", "The object was not found."))


    def _validate(self, url: str) -> Reply | None:
        """The notificationUrl validation handshake; a failure as Graph reports it."""
        assert self.validator is not None
        token = ("Validation: Testing client application reachability for subscription "
                 f"Request-Id: {uuid.uuid4()}")
        self.validations.append((url, token))
        try:
            status, content_type, text = self.validator(url, token)
        except Exception as exc:
            status, content_type, text = 0, "", repr(exc)
        if status == 200 and content_type.split(";")[0].strip() == "text/plain" \
                and text == token:
            return None
        return _json(400, _err("ValidationError", "Subscription validation request failed. "
                               "Notification endpoint must respond with 200 OK to validation "
                               "request."))


def _stamp(seconds: float) -> str:
    return f"{dt.datetime.fromtimestamp(seconds, dt.UTC):%Y-%m-%dT%H:%M:%S}.0000000Z"


def _message_view(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k in (
        "id", "subject", "internetMessageId", "receivedDateTime", "parentFolderId", "flag",
        "changeKey", "@odata.etag")}


def _err(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message,
                      "innerError": {"date": "2026-01-01T00:00:00", "request-id": "fake"}}}


def _json(status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode(),
                 {"Content-Type": "application/json", **(headers or {})})
