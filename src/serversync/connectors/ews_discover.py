"""EWS Autodiscover: find a mailbox's EWS URL from its address, safely.

We do this ourselves (SOAP ``GetUserSettings``, the documented request) instead of letting
exchangelib do it. exchangelib 5.6's ``Autodiscovery``:

* keeps a cache on disk — a ``shelve`` file in the temp directory
  (``/tmp/exchangelib.2.cache.<user>.py311``), shared by every process of that user, plus a
  process-wide cache keyed by (domain, credentials);
* checks every host with a dnspython ``A`` query, bypassing ``/etc/hosts`` and the system
  resolver;
* follows HTTP 302s, ``RedirectUrl`` answers, the plain-HTTP ``autodiscover.<domain>``
  redirect and SRV records to *any* https host whose certificate verifies, in any domain,
  and sends the credentials there;
* takes SRV records on port 443 only, preferring the highest priority number (RFC 2782
  prefers the lowest), and ends the whole discovery at the first 401.

What we do instead (Microsoft: "Generate a list of Autodiscover endpoints" and "Handling
Autodiscover error messages", learn.microsoft.com/exchange/client-developer/exchange-web-
services/):

1. Endpoints, in order: ``https://<domain>/autodiscover/autodiscover.svc``,
   ``https://autodiscover.<domain>/autodiscover/autodiscover.svc``; then — only with the
   profile's ``allow_plaintext`` — the unauthenticated ``GET
   http://autodiscover.<domain>/autodiscover/autodiscover.xml`` whose 302 may name an
   endpoint; then the DNS SRV record ``_autodiscover._tcp.<domain>`` (lowest priority,
   highest weight first; its port is used). The Active Directory SCP lookup is not done
   (it needs LDAP to a domain controller); names resolve through the system resolver.
2. Each endpoint is first asked *without* credentials. Only a 401 with a challenge gets the
   request again with them (NTLM/Negotiate, Digest or Basic, as offered); a redirect is seen
   before any credential is sent.
3. Trust: credentials go only to ``https`` URLs whose certificate verifies (system store
   plus the profile's ``ca_file``) on hosts inside the mailbox's domain — the domain itself
   or a subdomain. Every HTTP redirect, ``RedirectUrl``, ``RedirectAddress`` and SRV target is
   checked against that rule; one outside it is refused and reported
   (``autodiscover-redirect-refused``). Microsoft's guidance is to ask the user before
   following a redirect; a server has nobody to ask, so the administrator's answer is a fixed
   ``ews_url``. At most 10 redirects.
4. The answer is ``ExternalEwsUrl``, else ``InternalEwsUrl``. Its host may lie outside the
   domain (it is the organisation's own answer, received over verified TLS from a host
   inside it), but it must be https unless ``allow_plaintext`` is set.
5. A 401 from one endpoint is not conclusive (Microsoft: the next may accept the
   credentials); only when no endpoint answers and one refused the login is the result
   ``auth-failed``. ``InvalidUser`` ends discovery at once (``mailbox-not-found``).

No secret appears in a message: they name the endpoints and the login name only.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import ParseError
from xml.sax.saxutils import escape

import dns.exception
import dns.resolver
import requests
import requests.adapters
import requests.auth
from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException
from requests_ntlm import HttpNtlmAuth

from serversync.connectors.net import tls_context
from serversync.core.errors import AuthError, PermanentError, SyncError

log = logging.getLogger(__name__)

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
AD = "http://schemas.microsoft.com/exchange/2010/Autodiscover"
ACTION = "http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/GetUserSettings"
PATH = "/autodiscover/autodiscover.svc"
SETTINGS = ("ExternalEwsUrl", "InternalEwsUrl")
REQUESTED_VERSION = "Exchange2013"  # our oldest supported server (2013 SP1)
MAX_REDIRECTS = 10
REQUEST_TIMEOUT_S = 10.0  # per autodiscover request (a dead candidate must not take minutes)
_REDIRECTS = (301, 302, 303, 307, 308)
_clock = time.monotonic  # the cache's clock (tests replace it)


@dataclass(frozen=True, slots=True)
class Found:
    """A discovered EWS URL and the autodiscover endpoint that gave it."""

    ews_url: str
    via: str
    found_at: float = field(default_factory=lambda: _clock())


@dataclass(frozen=True, slots=True)
class Answer:
    """One parsed GetUserSettings response (the first UserResponse)."""

    code: str  # UserResponse/ErrorCode, or Response/ErrorCode when that is not NoError
    message: str = ""
    redirect_target: str | None = None
    settings: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- wire format


_REQUEST = """<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="{soap}" xmlns:a="{ad}" xmlns:wsa="{wsa}" xmlns:xsi="{xsi}">
  <soap:Header>
    <a:RequestedServerVersion>{version}</a:RequestedServerVersion>
    <wsa:Action>{action}</wsa:Action>
    <wsa:To>{to}</wsa:To>
  </soap:Header>
  <soap:Body>
    <a:GetUserSettingsRequestMessage>
      <a:Request>
        <a:Users>
          <a:User>
            <a:Mailbox>{mailbox}</a:Mailbox>
          </a:User>
        </a:Users>
        <a:RequestedSettings>
{settings}
        </a:RequestedSettings>
      </a:Request>
    </a:GetUserSettingsRequestMessage>
  </soap:Body>
</soap:Envelope>
"""


def build_request(address: str, url: str) -> bytes:
    """The GetUserSettings request for one mailbox, in the documented shape."""
    settings = "\n".join(f"          <a:Setting>{name}</a:Setting>" for name in SETTINGS)
    return _REQUEST.format(soap=SOAP, ad=AD, wsa=WSA, xsi=XSI, version=REQUESTED_VERSION,
                           action=ACTION, to=escape(url), mailbox=escape(address),
                           settings=settings).encode()


def parse_response(body: bytes) -> Answer:
    """The first UserResponse of a GetUserSettings answer; ValueError if it is none."""
    try:
        root = ElementTree.fromstring(body)
    except (ParseError, DefusedXmlException) as exc:
        raise ValueError(f"not XML ({type(exc).__name__})") from None
    response = root.find(f"{{{SOAP}}}Body/{{{AD}}}GetUserSettingsResponseMessage/"
                         f"{{{AD}}}Response")
    if response is None:
        fault = root.findtext(f"{{{SOAP}}}Body/{{{SOAP}}}Fault/faultstring")
        raise ValueError(f"SOAP fault: {fault}" if fault else "no GetUserSettings response")
    code = (response.findtext(f"{{{AD}}}ErrorCode") or "").strip()
    if code != "NoError":
        return Answer(code or "NoErrorCode",
                      (response.findtext(f"{{{AD}}}ErrorMessage") or "").strip())
    user = response.find(f"{{{AD}}}UserResponses/{{{AD}}}UserResponse")
    if user is None:
        raise ValueError("no UserResponse")
    target = (user.findtext(f"{{{AD}}}RedirectTarget") or "").strip()
    settings = {
        (s.findtext(f"{{{AD}}}Name") or "").strip(): (s.findtext(f"{{{AD}}}Value") or "").strip()
        for s in user.iterfind(f"{{{AD}}}UserSettings/{{{AD}}}UserSetting")}
    return Answer((user.findtext(f"{{{AD}}}ErrorCode") or "").strip(),
                  (user.findtext(f"{{{AD}}}ErrorMessage") or "").strip(),
                  target or None, {k: v for k, v in settings.items() if k and v})


def in_domain(host: str, domain: str) -> bool:
    """Whether ``host`` is ``domain`` or one of its subdomains (no IP literals)."""
    host, domain = host.lower().rstrip("."), domain.lower().rstrip(".")
    return bool(host) and (host == domain or host.endswith("." + domain))


# ---------------------------------------------------------------- HTTP


class _TlsAdapter(requests.adapters.HTTPAdapter):
    """Verify with our TLS context: the system store plus the profile's CA file."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def _session(ca_file: str | None) -> requests.Session:
    session = requests.Session()
    # No proxies or .netrc credentials from the environment: .netrc could add a login of
    # its own to requests we send to hosts we are still vetting.
    session.trust_env = False
    session.mount("https://", _TlsAdapter(tls_context(ca_file)))
    session.mount("http://", requests.adapters.HTTPAdapter(max_retries=0))
    return session


def _auth(challenge: str, username: str, password: str) -> requests.auth.AuthBase | None:
    """The strongest scheme the server offers that we speak (none: not an EWS login)."""
    offered = {part.strip().split(" ", 1)[0].lower() for part in challenge.split(",")}
    if offered & {"ntlm", "negotiate"}:
        return HttpNtlmAuth(username, password)
    if "digest" in offered:
        return requests.auth.HTTPDigestAuth(username, password)
    if "basic" in offered:
        return requests.auth.HTTPBasicAuth(username, password)
    return None


def _reason(exc: requests.RequestException) -> str:
    """A short, secret-free reason for a failed request."""
    inner: BaseException | None = exc
    while inner is not None:
        if isinstance(inner, ssl.SSLCertVerificationError):
            return f"TLS certificate not accepted ({inner.verify_message})"
        inner = inner.__context__ or inner.__cause__
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.exceptions.Timeout):
        return "no answer in time"
    text = str(exc)
    if "Name or service not known" in text or "NameResolutionError" in text \
            or "nodename nor servname" in text:
        return "host not found"
    if "Connection refused" in text:
        return "connection refused"
    return f"cannot connect ({type(exc).__name__})"


# ---------------------------------------------------------------- discovery


class Discovery:
    """One autodiscover run for one mailbox (see the module docstring for the rules)."""

    def __init__(self, address: str, username: str, password: str, *, ca_file: str | None,
                 allow_plaintext: bool, timeout: float, auth_fix: str,
                 session: requests.Session | None = None) -> None:
        self.address = address.strip().lower()
        self.domain = self.address.rpartition("@")[2]
        self.username, self._password = username, password
        self.allow_plaintext = allow_plaintext
        self.timeout = min(timeout, REQUEST_TIMEOUT_S)
        self.auth_fix = auth_fix
        self.session = session or _session(ca_file)
        self.notes: list[str] = []  # what each endpoint said, for the failure message
        self.rejected: list[str] = []  # endpoints that refused the credentials
        self.refused: list[tuple[str, str]] = []  # (from, to) redirects not followed
        self.tls_trouble = False
        self._visited: set[str] = set()
        self._addresses: set[str] = set()
        self._redirects = 0

    def run(self) -> Found:
        try:
            found = self._for_address(self.address)
        finally:
            self.session.close()
        if found is not None:
            return found
        raise self._failure()

    # ------------------------------------------------------------ the steps

    def _for_address(self, address: str) -> Found | None:
        self._addresses.add(address)
        domain = address.rpartition("@")[2]
        for url in (f"https://{domain}{PATH}", f"https://autodiscover.{domain}{PATH}"):
            found = self._try(url, address)
            if found is not None:
                return found
        if self.allow_plaintext:
            target = self._plaintext_redirect(domain)
            if target is not None and (found := self._try(target, address)) is not None:
                return found
        for url in self._srv(domain):
            found = self._try(url, address)
            if found is not None:
                return found
        return None

    def _try(self, url: str, address: str) -> Found | None:
        """POST to ``url``, following trusted redirects; None when it gave no EWS URL."""
        while True:
            key = f"{url.lower()} {address}"
            if key in self._visited:
                return None
            self._visited.add(key)
            outcome = self._post(url, address)
            if outcome is None:
                return None
            if isinstance(outcome, str):  # an HTTP redirect
                next_url = self._redirect(url, outcome)
                if next_url is None:
                    return None
                url = next_url
                continue
            answer = outcome
            if answer.code == "NoError":
                return self._found(url, answer)
            if answer.code == "RedirectUrl" and answer.redirect_target:
                next_url = self._redirect(url, answer.redirect_target)
                if next_url is None:
                    return None
                url = next_url
                continue
            if answer.code == "RedirectAddress" and answer.redirect_target:
                return self._readdress(url, answer.redirect_target)
            if answer.code == "InvalidUser":
                raise PermanentError(
                    f"EWS autodiscover at {url}: there is no mailbox for {address} "
                    "(InvalidUser)", fix="check the mailbox's address (its primary SMTP "
                    "address) and that the user has an Exchange mailbox on this server",
                    code="mailbox-not-found")
            self.notes.append(f"{url}: {answer.code} {answer.message}".strip())
            return None

    def _post(self, url: str, address: str) -> Answer | str | None:
        """An Answer, a redirect Location (str), or None (noted) for one endpoint."""
        body = build_request(address, url)
        headers = {"Content-Type": "text/xml; charset=utf-8"}
        try:
            reply = self.session.post(url, data=body, headers=headers, timeout=self.timeout,
                                      allow_redirects=False)
            if reply.status_code == 401:
                auth = _auth(reply.headers.get("WWW-Authenticate", ""), self.username,
                             self._password)
                if auth is None:
                    self.notes.append(f"{url}: asks for a login we do not speak "
                                      f"({reply.headers.get('WWW-Authenticate', 'none')[:60]})")
                    return None
                reply = self.session.post(url, data=body, headers=headers,
                                          timeout=self.timeout, allow_redirects=False,
                                          auth=auth)
                if reply.status_code == 401:
                    self.rejected.append(url)
                    self.notes.append(f"{url}: login of {self.username} refused (401)")
                    return None
        except requests.RequestException as exc:
            reason = _reason(exc)
            self.tls_trouble |= reason.startswith("TLS")
            self.notes.append(f"{url}: {reason}")
            return None
        if reply.status_code in _REDIRECTS:
            location = reply.headers.get("Location")
            if location:
                return location
        if reply.status_code != 200 and not (
                reply.status_code == 500 and reply.content.lstrip().startswith(b"<")):
            self.notes.append(f"{url}: HTTP {reply.status_code}")
            return None
        try:
            return parse_response(reply.content)
        except ValueError as exc:
            self.notes.append(f"{url}: not an autodiscover answer ({exc})")
            return None

    def _redirect(self, source: str, location: str) -> str | None:
        """The URL to follow a redirect to, or None (refused or too many, noted)."""
        target = urllib.parse.urljoin(source, location.strip())
        parts = urllib.parse.urlsplit(target)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" or parts.username or parts.password:
            self.notes.append(f"{source}: redirect to a non-https URL refused")
            self.refused.append((source, f"{parts.scheme}://{host}"))
            return None
        if not in_domain(host, self.domain):
            self.notes.append(f"{source}: redirect to {host}, outside {self.domain}, refused")
            self.refused.append((source, f"https://{host}"))
            return None
        self._redirects += 1
        if self._redirects > MAX_REDIRECTS:
            self.notes.append(f"{source}: more than {MAX_REDIRECTS} redirects")
            return None
        path = parts.path
        if path.lower().endswith("/autodiscover.xml"):  # a POX address: ask its SOAP sibling
            path = path[: -len("autodiscover.xml")] + "autodiscover.svc"
        return urllib.parse.urlunsplit(("https", parts.netloc, path, "", ""))

    def _readdress(self, source: str, new_address: str) -> Found | None:
        """``RedirectAddress``: start again for another address of the same domain."""
        new_address = new_address.strip().lower()
        domain = new_address.rpartition("@")[2]
        if "@" not in new_address or new_address in self._addresses:
            self.notes.append(f"{source}: redirect to address {new_address!r} ignored")
            return None
        if not in_domain(domain, self.domain):
            self.notes.append(f"{source}: redirect to an address in {domain}, outside "
                              f"{self.domain}, refused")
            self.refused.append((source, new_address))
            return None
        self._redirects += 1
        if self._redirects > MAX_REDIRECTS:
            self.notes.append(f"{source}: more than {MAX_REDIRECTS} redirects")
            return None
        return self._for_address(new_address)

    def _plaintext_redirect(self, domain: str) -> str | None:
        """The unauthenticated plain-HTTP step: only its 302 is used, and checked."""
        url = f"http://autodiscover.{domain}/autodiscover/autodiscover.xml"
        try:
            reply = self.session.get(url, timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as exc:
            self.notes.append(f"{url}: {_reason(exc)}")
            return None
        location = reply.headers.get("Location")
        if reply.status_code not in _REDIRECTS or not location:
            self.notes.append(f"{url}: HTTP {reply.status_code}, no redirect")
            return None
        return self._redirect(url, location)

    def _srv(self, domain: str) -> list[str]:
        """Endpoints from ``_autodiscover._tcp.<domain>`` SRV records, in RFC 2782 order."""
        name = f"_autodiscover._tcp.{domain}."
        try:
            answers: Any = dns.resolver.resolve(name, "SRV", lifetime=self.timeout)
        except dns.exception.DNSException as exc:
            self.notes.append(f"SRV {name.rstrip('.')}: {type(exc).__name__}")
            return []
        urls: list[str] = []
        for record in sorted(answers, key=lambda r: (r.priority, -r.weight)):
            host = record.target.to_text(omit_final_dot=True).lower()
            if not host or host == ".":
                continue  # "." means: no such service here
            if not in_domain(host, self.domain):
                self.notes.append(f"SRV {name.rstrip('.')}: {host} is outside {self.domain}, "
                                  "refused")
                self.refused.append((f"SRV {name.rstrip('.')}", f"https://{host}"))
                continue
            port = "" if record.port == 443 else f":{record.port}"
            urls.append(f"https://{host}{port}{PATH}")
        return urls

    def _found(self, url: str, answer: Answer) -> Found | None:
        ews_url = next((answer.settings[n] for n in SETTINGS if answer.settings.get(n)), None)
        if ews_url is None:
            self.notes.append(f"{url}: answered without an EWS URL")
            return None
        scheme = urllib.parse.urlsplit(ews_url).scheme.lower()
        if scheme != "https" and not (scheme == "http" and self.allow_plaintext):
            self.notes.append(f"{url}: offered {ews_url}, which is not https (set "
                              "allow_plaintext: true to accept plain http)")
            return None
        log.info("EWS autodiscover for %s: %s (from %s)", self.address, ews_url, url)
        return Found(ews_url, url)

    def _failure(self) -> SyncError:
        what = f"EWS autodiscover for {self.address}"
        if self.rejected:
            return AuthError(f"{what}: login of {self.username} was rejected (401) at "
                             f"{', '.join(self.rejected[:3])}", fix=self.auth_fix,
                             code="auth-failed")
        if self.refused:
            source, target = self.refused[0]
            return PermanentError(
                f"{what}: {source} pointed to {target}, outside {self.domain}; not followed "
                "(credentials are only sent over https to hosts in the mailbox's domain)",
                fix="if that server is yours, set ews_url on the profile to its EWS URL "
                    "(https://<host>/EWS/Exchange.asmx); otherwise correct the autodiscover "
                    "redirect or SRV record", code="autodiscover-redirect-refused")
        fix = (f"set ews_url on the profile (https://<host>/EWS/Exchange.asmx), or publish "
               f"autodiscover for {self.domain} (https://autodiscover.{self.domain}{PATH} or an "
               f"SRV record _autodiscover._tcp.{self.domain})")
        if self.tls_trouble:
            fix += "; if its certificate comes from a private CA, set ca_file on the profile"
        tried = "; ".join(self.notes[:8]) or "nothing to try"
        return PermanentError(f"{what} found no EWS URL: {tried}", fix=fix,
                              code="autodiscover-failed")


# ---------------------------------------------------------------- the per-profile cache

TTL_S = 3600.0
FAILURE_TTL_S = 60.0
PROBE_MAX_AGE_S = 30.0
_SHARED_FAILURES = ("autodiscover-failed", "autodiscover-redirect-refused")

CacheKey = tuple[str, str, str | None, bool]


@dataclass(slots=True)
class _Entry:
    found: Found | None
    error: SyncError | None
    at: float  # when this was learnt (time.monotonic)
    until: float  # used without asking again until then


_CACHE: dict[CacheKey, _Entry] = {}
_LOCKS: dict[CacheKey, threading.Lock] = {}
_GUARD = threading.Lock()


def cache_key(profile_name: str, address: str, ca_file: str | None,
              allow_plaintext: bool) -> CacheKey:
    """Per profile and mail domain (and the settings that change what discovery accepts)."""
    return (profile_name, address.strip().lower().rpartition("@")[2], ca_file, allow_plaintext)


def lookup(key: CacheKey, discover: Callable[[], Found], *,
           max_age: float | None = None) -> Found:
    """The EWS URL for ``key``: remembered, or found now by ``discover`` (blocking).

    Why a cache: one discovery costs several round trips — an unauthenticated and an
    authenticated POST per endpoint, timeouts on endpoints that do not exist, perhaps a DNS
    SRV query — and its answer is the organisation's, not the mailbox's: Exchange 2013 and
    later publish one EWS namespace per site and proxy every mailbox through it. Repeating
    it for every mailbox on every poll would multiply that cost by the number of mailboxes.
    So the URL is kept in this process's memory only (nothing on disk; a restart starts
    afresh), per (profile, mail domain, ca_file, allow_plaintext) — never credentials — and
    one discovery runs at a time per key, the others waiting for its answer.

    A changed answer is picked up: entries are refreshed after `TTL_S` (an hour), `forget`
    drops one as soon as a request through its URL fails, and Test & Enable (``max_age`` =
    `PROBE_MAX_AGE_S`) accepts only an answer from the last half minute. If a refresh
    finds nothing at all, a sync run keeps the last URL that worked (asking again a minute
    later) rather than stopping every mailbox over a passing outage; Test & Enable reports
    the failure. Failures that concern the domain (no answer, a refused redirect) are shared
    for `FAILURE_TTL_S` so a thousand mailboxes do not each wait out the same timeouts;
    a refused login or an unknown mailbox concerns one login and is never shared.
    """
    with _GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        now = _clock()
        with _GUARD:
            entry = _CACHE.get(key)
        young = entry is not None and now < entry.until and (
            max_age is None or now - entry.at < max_age)
        if entry is not None and young and entry.found is not None:
            return entry.found
        if entry is not None and young and entry.error is not None:
            error = entry.error
            raise type(error)(f"{error.message} (found {now - entry.at:.0f} s ago)",
                              fix=error.fix, code=error.code)
        try:
            found = discover()
        except SyncError as exc:
            if exc.code not in _SHARED_FAILURES:
                raise
            stale = entry.found if entry is not None else None
            now = _clock()
            with _GUARD:
                if stale is None or exc.code != "autodiscover-failed":
                    _CACHE[key] = _Entry(None, exc, now, now + FAILURE_TTL_S)
                elif max_age is None:
                    log.warning("EWS autodiscover failed (%s); keeping %s for now",
                                exc.message, stale.ews_url)
                    _CACHE[key] = _Entry(stale, None, entry.at if entry else now,
                                         now + FAILURE_TTL_S)
                    return stale
                # else: Test & Enable reports the failure; the runs' fallback stays
            raise
        with _GUARD:
            _CACHE[key] = _Entry(found, None, found.found_at, found.found_at + TTL_S)
        return found


def forget(key: CacheKey, ews_url: str) -> None:
    """Drop the remembered URL for ``key`` if it is still ``ews_url`` (a request failed)."""
    with _GUARD:
        entry = _CACHE.get(key)
        if entry is not None and entry.found is not None and entry.found.ews_url == ews_url:
            del _CACHE[key]


def clear() -> None:
    """Forget every remembered answer (tests use it between cases)."""
    with _GUARD:
        _CACHE.clear()
