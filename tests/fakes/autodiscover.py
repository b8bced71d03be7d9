"""A loopback Exchange Autodiscover service (SOAP, ``/autodiscover/autodiscover.svc``) over TLS.

What it is for: testing `serversync.connectors.ews_discover` end to end without a real
Exchange and without one packet leaving the machine. Three pieces:

* `TestCA` — a throw-away certificate authority (``cryptography``) and one server
  certificate naming every test host, so the client verifies TLS for real with the profile's
  ``ca_file``;
* `AutodiscoverServer` — one HTTPS listener on 127.0.0.1 that serves several *virtual
  hosts* (told apart by the ``Host`` header): hosts that answer ``GetUserSettings``, hosts
  that redirect, a web site that answers 404, and the EWS host, whose requests go to an
  `EwsServer`'s handler — plus a plain-HTTP listener for the unauthenticated
  ``GET http://autodiscover.<domain>/autodiscover/autodiscover.xml`` redirect step;
* `LocalNames` — resolves the test names to 127.0.0.1 *inside the process* (a patched
  ``socket.getaddrinfo``, which also maps port 443/80 to the listeners' ephemeral ports),
  answers dnspython SRV queries from a table, and refuses (and records) any connection or
  datagram to a non-loopback address. Tests assert which names were looked up.

Wire shapes follow Microsoft's documentation (``tests/fixtures/ews/autodiscover-*.xml``
name the pages): the GetUserSettings request and response, ``RedirectAddress`` /
``RedirectUrl`` / ``InvalidUser`` error codes, HTTP 302 redirects and 401 challenges.
Only what our client sends is understood; anything else is answered with HTTP 400 and
recorded in ``errors`` so a test notices at once.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

from tests.fakes.ews_server import EwsServer
from tests.fakes.loopback import LoopbackServer, Recorded, Reply

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
AD = "http://schemas.microsoft.com/exchange/2010/Autodiscover"
ACTION = "http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/GetUserSettings"
PATH = "/autodiscover/autodiscover.svc"


# ---------------------------------------------------------------- a test CA


@dataclass(frozen=True)
class TestCA:
    """A CA certificate (``ca_file``) and a server certificate + key for ``names``."""

    __test__ = False  # not a test class

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path, names: Iterable[str]) -> TestCA:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serversync test CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(hours=1))
              .not_valid_after(now + dt.timedelta(days=2))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False), critical=True)
              .add_extension(ca_ski, critical=False)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        names = list(names)
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ca_ski), critical=False)
                .sign(ca_key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        made = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        made.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        made.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        made.key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return made

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


# ---------------------------------------------------------------- an HTTPS listener


class TlsServer:
    """Like `LoopbackServer`, over TLS; the handshake runs in the request's thread."""

    def __init__(self, handler: Any, context: ssl.SSLContext) -> None:
        self.handler, self.context = handler, context
        self.requests: list[Recorded] = []
        self.errors: list[Exception] = []
        self.handshake_failures = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> TlsServer:
        outer = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Recorded(self.command, self.path,
                                   {k.lower(): v for k, v in self.headers.items()}, body)
                with outer._lock:
                    outer.requests.append(request)
                try:
                    reply = outer.handler(request)
                except Exception as exc:  # a bug in the fake: tests check `errors` is empty
                    outer.errors.append(exc)
                    reply = Reply(500, f"fake server error: {exc!r}".encode())
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            do_GET = do_POST = do_HEAD = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        class _Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, address = self.socket.accept()
                sock.settimeout(10)
                return outer.context.wrap_socket(sock, server_side=True,
                                                 do_handshake_on_connect=False), address

            def finish_request(self, request: Any, client_address: Any) -> None:
                try:
                    request.do_handshake()
                except (ssl.SSLError, OSError):
                    outer.handshake_failures += 1  # e.g. the client refused our certificate
                    return
                super().finish_request(request, client_address)

        self._server = _Server(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         kwargs={"poll_interval": 0.05}).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# ---------------------------------------------------------------- the autodiscover service


def _host(request: Recorded) -> str:
    return request.headers.get("host", "").rsplit(":", 1)[0].lower()


def user_response(code: str, message: str, *, redirect_target: str | None = None,
                  settings: dict[str, str] | None = None) -> bytes:
    """A GetUserSettings response in the documented shape (see the response fixtures)."""
    envelope = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"s": SOAP, "a": WSA})
    header = etree.SubElement(envelope, f"{{{SOAP}}}Header")
    action = etree.SubElement(header, f"{{{WSA}}}Action")
    action.set(f"{{{SOAP}}}mustUnderstand", "1")
    action.text = ACTION + "Response"
    info = etree.SubElement(header, f"{{{AD}}}ServerVersionInfo", nsmap={"h": AD, "i": XSI})
    for tag, value in (("MajorVersion", "15"), ("MinorVersion", "1"),
                       ("MajorBuildNumber", "2507"), ("MinorBuildNumber", "6"),
                       ("Version", "Exchange2015")):
        etree.SubElement(info, f"{{{AD}}}{tag}").text = value
    body = etree.SubElement(envelope, f"{{{SOAP}}}Body")
    message_el = etree.SubElement(body, f"{{{AD}}}GetUserSettingsResponseMessage",
                                  nsmap={None: AD})
    response = etree.SubElement(message_el, f"{{{AD}}}Response", nsmap={"i": XSI})
    etree.SubElement(response, f"{{{AD}}}ErrorCode").text = "NoError"
    etree.SubElement(response, f"{{{AD}}}ErrorMessage")
    users = etree.SubElement(response, f"{{{AD}}}UserResponses")
    user = etree.SubElement(users, f"{{{AD}}}UserResponse")
    etree.SubElement(user, f"{{{AD}}}ErrorCode").text = code
    etree.SubElement(user, f"{{{AD}}}ErrorMessage").text = message
    target = etree.SubElement(user, f"{{{AD}}}RedirectTarget")
    if redirect_target is None:
        target.set(f"{{{XSI}}}nil", "true")
    else:
        target.text = redirect_target
    etree.SubElement(user, f"{{{AD}}}UserSettingErrors")
    found = etree.SubElement(user, f"{{{AD}}}UserSettings")
    for name, value in (settings or {}).items():
        setting = etree.SubElement(found, f"{{{AD}}}UserSetting")
        setting.set(f"{{{XSI}}}type", "StringSetting")
        etree.SubElement(setting, f"{{{AD}}}Name").text = name
        etree.SubElement(setting, f"{{{AD}}}Value").text = value
    return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))


@dataclass
class AutodiscoverServer:
    """Virtual hosts on one HTTPS port (and one plain HTTP port); all state is public."""

    ews: EwsServer
    tls: ssl.SSLContext
    answering: set[str] = field(default_factory=set)  # hosts that answer GetUserSettings
    ews_hosts: set[str] = field(default_factory=set)  # hosts whose /EWS/ goes to `ews`
    settings: dict[str, str] = field(default_factory=dict)  # the UserSettings answered
    redirects: dict[str, str] = field(default_factory=dict)  # host -> 302 Location (no auth)
    redirect_urls: dict[str, str] = field(default_factory=dict)  # host -> RedirectUrl answer
    redirect_addresses: dict[str, str] = field(default_factory=dict)  # mailbox -> new address
    plain_redirects: dict[str, str] = field(default_factory=dict)  # host -> 302 on http GET
    errors: list[str] = field(default_factory=list)  # requests the fake did not understand

    def __post_init__(self) -> None:
        self.https = TlsServer(self.handle, self.tls)
        self.http = LoopbackServer(self.handle_plain)

    def start(self) -> AutodiscoverServer:
        self.https.start()
        self.http.start()
        return self

    def stop(self) -> None:
        self.https.stop()
        self.http.stop()

    @property
    def ports(self) -> dict[int, int]:
        """Well-known port -> the listener's ephemeral port (for `LocalNames`)."""
        return {443: self.https.port, 80: self.http.port}

    def requests_to(self, host: str, path: str = PATH) -> list[Recorded]:
        return [r for r in self.https.requests
                if _host(r) == host and r.path.lower().startswith(path.lower())]

    # ------------------------------------------------------------ HTTP

    def handle_plain(self, request: Recorded) -> Reply:
        """``GET http://autodiscover.<domain>/autodiscover/autodiscover.xml``: a 302 or 404."""
        location = self.plain_redirects.get(_host(request))
        if request.method == "GET" and location and \
                request.path.lower() == "/autodiscover/autodiscover.xml":
            return Reply(302, b"", {"Location": location})
        return Reply(404, b"<html><body>Not Found</body></html>")

    def handle(self, request: Recorded) -> Reply:
        host, path = _host(request), request.path.split("?", 1)[0].lower()
        if host in self.ews_hosts and path.startswith("/ews/exchange.asmx"):
            return self.ews.handle(request)
        if path != PATH or not ({host} & (self.answering | set(self.redirects)
                                          | set(self.redirect_urls))):
            return Reply(404, b"<html><body>Not Found</body></html>")  # a web site
        if request.method != "POST":
            return Reply(405, b"")
        if host in self.redirects:
            return Reply(302, b"", {"Location": self.redirects[host]})
        if self._caller(request) is None:
            return Reply(401, b"", {"WWW-Authenticate": f'Basic realm="{host}"'})
        mailbox = self._mailbox(request, host)
        if mailbox is None:
            return Reply(400, b"bad request")
        if host in self.redirect_urls:
            body = user_response("RedirectUrl", "Redirection URL.",
                                 redirect_target=self.redirect_urls[host])
        elif mailbox in self.redirect_addresses:
            body = user_response("RedirectAddress", "Redirection address.",
                                 redirect_target=self.redirect_addresses[mailbox])
        elif mailbox not in self.ews.mailboxes:
            body = user_response("InvalidUser", f"Invalid user: '{mailbox}'")
        else:
            body = user_response("NoError", "No error.", settings=self.settings)
        return Reply(200, body, {"Content-Type": "text/xml; charset=utf-8"})

    def _caller(self, request: Recorded) -> str | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.ews.passwords.get(user) == password else None

    def _mailbox(self, request: Recorded, host: str) -> str | None:
        """The requested mailbox, after checking the request is the one we document."""
        try:
            envelope = etree.fromstring(request.body)
        except etree.XMLSyntaxError:
            self.errors.append("not XML")
            return None
        checks = {
            "RequestedServerVersion": envelope.findtext(
                f"{{{SOAP}}}Header/{{{AD}}}RequestedServerVersion"),
            "Action": envelope.findtext(f"{{{SOAP}}}Header/{{{WSA}}}Action"),
            "To": envelope.findtext(f"{{{SOAP}}}Header/{{{WSA}}}To"),
        }
        wanted = {"RequestedServerVersion": "Exchange2013", "Action": ACTION,
                  "To": f"https://{request.headers.get('host', '')}{PATH}"}
        request_el = envelope.find(f"{{{SOAP}}}Body/{{{AD}}}GetUserSettingsRequestMessage/"
                                   f"{{{AD}}}Request")
        users = [] if request_el is None else [
            (u.text or "").strip().lower()
            for u in request_el.iterfind(f"{{{AD}}}Users/{{{AD}}}User/{{{AD}}}Mailbox")]
        names = [] if request_el is None else [
            s.text for s in request_el.iterfind(f"{{{AD}}}RequestedSettings/{{{AD}}}Setting")]
        if checks != wanted or len(users) != 1 or not names:
            self.errors.append(f"unexpected request to {host}: {checks}, {users}, {names}")
            return None
        return users[0]


# ---------------------------------------------------------------- name resolution, locally


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class LocalNames:
    """Test names -> 127.0.0.1, SRV answers from a table, and nothing off the machine.

    ``asked`` lists every host name handed to ``getaddrinfo`` (IP literals excepted),
    ``srv_asked`` every dnspython query, ``blocked`` every connect/sendto to a
    non-loopback address (refused with an OSError before any packet is sent).
    """

    names: set[str]
    ports: dict[int, int]
    srv: dict[str, list[str]] = field(default_factory=dict)  # "_autodiscover._tcp.x" -> rdata
    asked: list[str] = field(default_factory=list)
    srv_asked: list[str] = field(default_factory=list)
    blocked: list[Any] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> LocalNames:
        real_getaddrinfo = socket.getaddrinfo
        names = self

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            name = host.decode() if isinstance(host, bytes) else host
            if name is None or name == "localhost" or _is_loopback(str(name)):
                return real_getaddrinfo(host, port, *args, **kwargs)
            name = str(name).lower().rstrip(".")
            names.asked.append(name)
            if name not in names.names:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            number = int(port) if port not in (None, "") else 0
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     ("127.0.0.1", names.ports.get(number, number)))]

        def resolve(resolver: Any, qname: Any, rdtype: Any = "A", *args: Any,
                    **kwargs: Any) -> Any:
            text = str(qname).lower()
            text = text if text.endswith(".") else text + "."
            names.srv_asked.append(text)
            kind = dns.rdatatype.RdataType.make(rdtype)
            records = names.srv.get(text.rstrip(".")) if kind == dns.rdatatype.SRV else None
            if not records:
                raise dns.resolver.NXDOMAIN(qnames=[dns.name.from_text(text)])
            return [dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SRV, r)
                    for r in records]

        def guard(method: Any, at: int) -> Any:
            def guarded(sock: socket.socket, *args: Any) -> Any:
                address = args[at] if len(args) > at else None
                if isinstance(address, tuple) and not _is_loopback(str(address[0])):
                    names.blocked.append(address)
                    raise OSError(f"test guard: no traffic to {address[0]} (not loopback)")
                return method(sock, *args)
            return guarded

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(dns.resolver.Resolver, "resolve", resolve)
        monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect, 0))
        monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex, 0))
        monkeypatch.setattr(socket.socket, "sendto", guard(socket.socket.sendto, -1))
        return self


@contextmanager
def served(ews: EwsServer, ca: TestCA) -> Iterator[AutodiscoverServer]:
    server = AutodiscoverServer(ews, ca.server_context()).start()
    try:
        yield server
    finally:
        server.stop()

