"""Loopback stand-ins for Google: the OAuth 2.0 token endpoint, IMAP and SMTP with XOAUTH2.

* Token endpoint (``POST /token``): the JWT-bearer grant of a service account with
  domain-wide delegation (RFC 7523; Google's "Using OAuth 2.0 for Server to Server
  Applications") — the RS256 signature is verified with the account's public key, ``aud``
  must be the endpoint, ``sub`` must be a user of the domain (``invalid_grant`` otherwise), and
  the client must be authorized for ``https://mail.google.com/`` (``unauthorized_client``
  otherwise) — and the refresh-token grant of 3-legged OAuth.
* IMAP: greeting with ``AUTH=XOAUTH2 SASL-IR``, ``AUTHENTICATE XOAUTH2`` (a bad token answers
  ``NO [AUTHENTICATIONFAILED]`` as Gmail does), ENABLE, CAPABILITY, STATUS, EXAMINE/SELECT of
  an empty INBOX, NOOP, LOGOUT. Enough for login and folder checks, not a mail store.
* SMTP (aiosmtpd): ``AUTH XOAUTH2``; a bad token gets Google's 334 base64-JSON challenge, then
  535, as documented on Google's "OAuth 2.0 Mechanism" page.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import socketserver
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes.loopback import LoopbackServer, Recorded, Reply

SCOPE = "https://mail.google.com/"


def new_service_account_key() -> tuple[str, rsa.RSAPublicKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, key.public_key()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class GoogleState:
    users: set[str] = field(default_factory=set)
    service_accounts: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    delegated: set[str] = field(default_factory=set)  # service accounts with DWD for SCOPE
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    clients: dict[str, str] = field(default_factory=dict)  # OAuth client id -> secret
    tokens: dict[str, str] = field(default_factory=dict)  # access token -> user
    assertions: list[dict[str, Any]] = field(default_factory=list)  # decoded JWT claims
    imap_auth: list[str] = field(default_factory=list)  # decoded XOAUTH2 strings (IMAP)
    smtp_auth: list[str] = field(default_factory=list)
    messages: list[Envelope] = field(default_factory=list)


class GoogleServers:
    """Token endpoint + IMAP + SMTP sharing one `GoogleState`."""

    def __init__(self) -> None:
        self.state = GoogleState()
        self.http = LoopbackServer(self._handle)
        self._ids = itertools.count(1)
        self._imap: socketserver.ThreadingTCPServer | None = None
        self._smtp: Controller | None = None
        self.imap_port = 0
        self.smtp_port = 0

    @property
    def token_url(self) -> str:
        return f"{self.http.base_url}/token"

    @property
    def requests(self) -> list[Recorded]:
        return self.http.requests

    def start(self) -> GoogleServers:
        self.http.start()
        state = self.state

        class Imap(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                _imap_session(self, state)

        self._imap = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Imap)
        self._imap.daemon_threads = True
        self.imap_port = int(self._imap.server_address[1])
        threading.Thread(target=self._imap.serve_forever, daemon=True).start()
        self.smtp_port = _free_port()  # aiosmtpd's Controller probes its port: pick one
        self._smtp = Controller(_SmtpHandler(state), hostname="127.0.0.1", port=self.smtp_port,
                                auth_require_tls=False)
        self._smtp.start()
        return self

    def stop(self) -> None:
        self.http.stop()
        if self._imap is not None:
            self._imap.shutdown()
            self._imap.server_close()
        if self._smtp is not None:
            self._smtp.stop()

    # ------------------------------------------------------------ token endpoint

    def _handle(self, request: Recorded) -> Reply:
        if request.method != "POST" or not request.path.startswith("/token"):
            return Reply(404)
        form = dict(urllib.parse.parse_qsl(request.body.decode()))
        grant = form.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._jwt(form.get("assertion", ""))
        if grant == "refresh_token":
            if self.state.clients.get(form.get("client_id", "")) != form.get("client_secret"):
                return _json(401, {"error": "invalid_client",
                                   "error_description": "Unauthorized"})
            user = self.state.refresh_tokens.get(form.get("refresh_token", ""))
            if user is None:
                return _json(400, {"error": "invalid_grant",
                                   "error_description": "Token has been expired or revoked."})
            return self._issue(user)
        return _json(400, {"error": "unsupported_grant_type"})

    def _jwt(self, assertion: str) -> Reply:
        try:
            head, body, signature = assertion.split(".")
            claims = json.loads(_unb64(body))
            header = json.loads(_unb64(head))
        except ValueError:
            return _json(400, {"error": "invalid_grant", "error_description": "Bad JWT"})
        self.state.assertions.append({"header": header, **claims})
        key = self.state.service_accounts.get(claims.get("iss", ""))
        if key is None:
            return _json(401, {"error": "invalid_client",
                               "error_description": "The OAuth client was not found."})
        try:
            key.verify(_unb64(signature), f"{head}.{body}".encode(), padding.PKCS1v15(),
                       hashes.SHA256())
        except InvalidSignature:
            return _json(400, {"error": "invalid_grant", "error_description":
                               "Invalid JWT Signature."})
        if claims.get("aud") != self.token_url or claims.get("exp", 0) < time.time():
            return _json(400, {"error": "invalid_grant",
                               "error_description": "Invalid JWT: Token must be a short-lived "
                                                   "token and in a reasonable timeframe"})
        if claims.get("iss") not in self.state.delegated or claims.get("scope") != SCOPE:
            return _json(401, {"error": "unauthorized_client", "error_description":
                               "Client is unauthorized to retrieve access tokens using this "
                               "method, or client not authorized for any of the scopes "
                               "requested."})
        if claims.get("sub") not in self.state.users:
            return _json(400, {"error": "invalid_grant",
                               "error_description": "Invalid email or User ID"})
        return self._issue(str(claims["sub"]))

    def _issue(self, user: str) -> Reply:
        token = f"ya29.fake-{next(self._ids)}"
        self.state.tokens[token] = user
        return _json(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer",
                           "scope": SCOPE})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _json(status: int, data: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


def _check_xoauth2(payload: str, state: GoogleState) -> str | None:
    """The user a XOAUTH2 initial response authenticates, or None."""
    try:
        text = base64.b64decode(payload).decode()
    except ValueError:
        return None
    parts = dict(p.split("=", 1) for p in text.split("\x01") if "=" in p)
    user, auth = parts.get("user", ""), parts.get("auth", "")
    if not auth.startswith("Bearer "):
        return None
    return user if state.tokens.get(auth[7:]) == user else None


def _imap_session(handler: socketserver.StreamRequestHandler, state: GoogleState) -> None:
    write = handler.wfile.write
    write(b"* OK [CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN "
          b"X-GM-EXT-1 SASL-IR AUTH=XOAUTH2 AUTH=PLAIN ENABLE CONDSTORE] Gimap ready\r\n")
    user: str | None = None
    for raw in handler.rfile:
        line = raw.decode().rstrip("\r\n")
        tag, _, rest = line.partition(" ")
        command, _, args = rest.partition(" ")
        command = command.upper()
        if command == "CAPABILITY":
            write(b"* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE ENABLE CONDSTORE "
                  b"SASL-IR AUTH=XOAUTH2\r\n")
        elif command == "AUTHENTICATE":
            mechanism, _, payload = args.partition(" ")
            state.imap_auth.append(base64.b64decode(payload).decode(errors="replace"))
            user = _check_xoauth2(payload, state) if mechanism.upper() == "XOAUTH2" else None
            if user is None:
                write(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"
                      .encode())
                continue
            write(f"{tag} OK {user} authenticated (Success)\r\n".encode())
            continue
        elif command == "LOGOUT":
            write(f"* BYE LOGOUT Requested\r\n{tag} OK 73 good day (Success)\r\n".encode())
            return
        elif user is None and command not in ("NOOP",):
            write(f"{tag} BAD Command not valid in this state\r\n".encode())
            continue
        elif command == "ENABLE":
            write(b"* ENABLED CONDSTORE\r\n")
        elif command in ("EXAMINE", "SELECT"):
            write(b"* FLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen)\r\n"
                  b"* OK [UIDVALIDITY 11] UIDs valid.\r\n* 0 EXISTS\r\n* 0 RECENT\r\n"
                  b"* OK [UIDNEXT 1] Predicted next UID.\r\n* OK [HIGHESTMODSEQ 100]\r\n")
        elif command == "STATUS":
            mailbox = args.split(" ", 1)[0]
            write(f"* STATUS {mailbox} (UIDVALIDITY 11 UIDNEXT 1 MESSAGES 0 "
                  f"HIGHESTMODSEQ 100)\r\n".encode())
        write(f"{tag} OK {command} (Success)\r\n".encode())


class _SmtpHandler:
    def __init__(self, state: GoogleState) -> None:
        self.state = state

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        payload = args[1] if len(args) > 1 else ""
        self.state.smtp_auth.append(base64.b64decode(payload).decode(errors="replace"))
        user = _check_xoauth2(payload, self.state)
        if user is not None:
            return AuthResult(success=True, auth_data=user)
        error = json.dumps({"status": "401", "schemes": "bearer",
                            "scope": SCOPE}).encode()
        await server.challenge_auth(base64.b64encode(error), encode_to_b64=False)
        return AuthResult(success=False, handled=False,
                          message="535-5.7.8 Username and Password not accepted.")

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication Required"
        if session.auth_data != address:
            return f"553 5.7.1 Sender address rejected: not owned by user {session.auth_data}"
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.state.messages.append(envelope)
        return "250 2.0.0 OK"
