"""Pytest plugin: the real loopback test servers (Dovecot, Postfix, Radicale).

Load it with ``pytest_plugins = ["tests.testservers"]`` (or ``-p tests.testservers``).
Tests that need the servers request the session fixture ``test_servers``; it runs
``testservers/start.sh`` once (idempotent: servers already up are left alone) and at
the end stops only the servers it started.  ``SERVERSYNC_SKIP_SERVERS=1`` skips them.

The helpers below are plain functions (stdlib only), usable from any test or benchmark
once the servers run.  They act as the service account (Dovecot master user) where
they need another user's mailbox, so they work for every user in the passdb.
All traffic stays on loopback.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import http.client
import imaplib
import itertools
import os
import re
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "testservers"
ROOT = Path(os.environ.get("SERVERSYNC_TESTSERVERS_ROOT", "/srv/serversync-test"))
DOVECOT_CONF = ROOT / "dovecot" / "dovecot.conf"
# the self-signed server certificate, which is also the clients' CA
CA_FILE = ROOT / "dovecot" / "ssl" / "cert.pem"
MAIL_ROOT = ROOT / "dovecot" / "mail"
VMAIL_UID = VMAIL_GID = 5000

HOST = "127.0.0.1"
HOST6 = "::1"
# loopback too, but not in the certificate: TLS host-name verification fails there
HOST_MISMATCH = "127.0.0.2"
IMAP_PORT = 10143  # plaintext + STARTTLS
IMAPS_PORT = 10993
POP3_PORT = 10110  # plaintext + STLS
POP3S_PORT = 10995
LMTP_PORT = 10024
SUBMISSION_PORT = 10025  # AUTH required, STARTTLS
SUBMISSIONS_PORT = 10465  # implicit TLS
MX_PORT = 10026  # no AUTH: mail "from outside"; no relaying
DAV_PORT = 15232
DAV_URL = f"http://{HOST}:{DAV_PORT}"

DOMAIN = "example.test"
OTHER_DOMAIN = "other.test"
SVC = f"svc@{DOMAIN}"  # service account: Dovecot master user, may send as anyone, DAV rights on all
DELEGATE = f"delegate@{DOMAIN}"  # ordinary user; rights on others only via ACLs the tests grant
SINK = f"sink@{DOMAIN}"  # every non-local recipient is rewritten to sink+<local>=<domain>@
ERIN = f"erin@{OTHER_DOMAIN}"  # outside the service account's impersonation scope
USERS: dict[str, str] = {
    f"{u}@{DOMAIN}": f"{u}-pw"
    for u in ("alice", "bob", "carol", "dave", "support", "bench", "sink", "svc", "delegate",
              "frank", "grace", "heidi", "ivan", "judy", "kim", "leo")
}
USERS[ERIN] = "erin-pw"
# folders Dovecot creates for every user (auto = subscribe); reset_mailbox keeps them
DEFAULT_FOLDERS = ("INBOX", "Drafts", "Sent", "Trash")


@dataclasses.dataclass(frozen=True)
class TestServers:
    """What the ``test_servers`` fixture yields: where the servers are."""

    __test__ = False  # not a test class, despite the name

    host: str = HOST
    root: Path = ROOT
    ca_file: Path = CA_FILE
    dovecot_conf: Path = DOVECOT_CONF
    started: tuple[str, ...] = ()  # servers this session started (and will stop)


@pytest.fixture(scope="session")
def test_servers() -> Iterator[TestServers]:
    """Start the servers once per run (testservers/start.sh is idempotent) and stop,
    at the end, only those this run started.  Skips when SERVERSYNC_SKIP_SERVERS=1."""
    if os.environ.get("SERVERSYNC_SKIP_SERVERS") == "1":
        pytest.skip("SERVERSYNC_SKIP_SERVERS=1")
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "start.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode:
        pytest.fail(
            f"testservers/start.sh failed ({proc.returncode}); did testservers/install.sh run?\n"
            f"{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    started = tuple(
        line.split()[1] for line in proc.stdout.splitlines() if line.startswith("started:")
    )
    yield TestServers(started=started)
    if started:
        subprocess.run(
            ["bash", str(SCRIPTS / "stop.sh"), *started],
            capture_output=True,
            timeout=60,
            check=False,
        )


# ---------------------------------------------------------------- small helpers


def password(user: str) -> str:
    """The fixture password of ``user`` (``<localpart>-pw``)."""
    return USERS.get(user) or f"{user.split('@')[0]}-pw"


def ssl_context(**kwargs: object) -> ssl.SSLContext:
    """A client TLS context that trusts the test certificate (host names checked)."""
    return ssl.create_default_context(cafile=str(CA_FILE), **kwargs)  # type: ignore[arg-type]


def quote(mailbox: str) -> str:
    """An IMAP quoted string (imaplib quotes nothing itself)."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _base_user(address: str) -> str:
    """alice+tag@example.test -> alice@example.test (Dovecot's recipient_delimiter)."""
    local, _, domain = address.partition("@")
    return f"{local.split('+')[0]}@{domain}".lower()


def imap_login(
    user: str, password_: str | None = None, *, tls: str | None = None, host: str = HOST
) -> imaplib.IMAP4:
    """An IMAP connection logged in as ``user`` with its own password.

    ``tls``: None (plaintext on trusted loopback), "starttls" or "ssl" (verified)."""
    if tls == "ssl":
        conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
            host, IMAPS_PORT, ssl_context=ssl_context(), timeout=10
        )
    else:
        conn = imaplib.IMAP4(host, IMAP_PORT, timeout=10)
        if tls == "starttls":
            conn.starttls(ssl_context())
        elif tls is not None:
            raise ValueError(f"tls must be None, 'starttls' or 'ssl', not {tls!r}")
    try:
        conn.login(user, password_ if password_ is not None else password(user))
    except BaseException:
        conn.shutdown()
        raise
    return conn


def master_login(user: str) -> imaplib.IMAP4:
    """An IMAP connection to ``user``'s mailbox as the service account (``user*svc``)."""
    return imap_login(f"{user}*{SVC}", USERS[SVC])


def _list_mailboxes(conn: imaplib.IMAP4) -> list[tuple[str, str]]:
    """[(flags, name)] of the personal namespace (no shared/ entries)."""
    typ, data = conn.list('""', "*")
    assert typ == "OK", data
    out = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):  # name sent as a literal
            head, name_b = item
            m = re.match(rb"\((.*?)\) ", head)
            flags, name = (m.group(1) if m else b"").decode(), name_b.decode()
        else:
            m = re.match(rb'\((.*?)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)$', item)
            assert m, item
            flags, raw = m.group(1).decode(), m.group(2).decode()
            name = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        if name == "shared" or name.startswith("shared/"):
            continue
        out.append((flags, name))
    return out


def wait_for_message(
    user: str, message_id: str, mailbox: str = "INBOX", timeout: float = 10.0
) -> int:
    """Poll ``user``'s mailbox (as the service account) until a message with this
    Message-ID is there; return its UID.  Raises TimeoutError."""
    conn = master_login(_base_user(user))
    try:
        typ, data = conn.select(quote(mailbox), readonly=True)
        assert typ == "OK", data
        deadline = time.monotonic() + timeout
        while True:
            typ, data = conn.uid("SEARCH", "HEADER", "Message-ID", quote(message_id))
            assert typ == "OK", data
            uids = data[0].split() if data and data[0] else []
            if uids:
                return int(uids[-1])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{message_id} not in {user}'s {mailbox} after {timeout} s")
            time.sleep(0.02)
            conn.noop()  # lets Dovecot report new mail
    finally:
        conn.logout()


def ensure_message_id(raw: bytes) -> tuple[str, bytes]:
    """(Message-ID, message): adds a Message-ID header if the message has none."""
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    m = re.search(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", head, re.IGNORECASE | re.MULTILINE)
    if m:
        return m.group(1).decode(), raw
    mid = email.utils.make_msgid(domain="serversync.test")
    return mid, f"Message-ID: {mid}\r\n".encode() + raw


def deliver(to_addr: str, raw: bytes, mail_from: str = "outsider@external.test") -> str:
    """Inject ``raw`` through Postfix's MX port (as mail from outside) and wait until it
    is in the recipient's INBOX.  Returns the Message-ID (added if missing)."""
    message_id, raw = ensure_message_id(raw)
    with smtplib.SMTP(HOST, MX_PORT, timeout=10) as smtp:
        smtp.sendmail(mail_from, [to_addr], raw)
    wait_for_message(to_addr, message_id)
    return message_id


def deliver_lmtp(to_addr: str, raw: bytes, mail_from: str = "outsider@external.test") -> str:
    """Deliver ``raw`` straight into Dovecot over LMTP: in the INBOX when this returns.
    Returns the Message-ID (added if missing)."""
    message_id, raw = ensure_message_id(raw)
    lmtp = smtplib.LMTP(HOST, LMTP_PORT, timeout=10)
    try:
        refused = lmtp.sendmail(mail_from, [to_addr], raw)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)
    finally:
        lmtp.quit()
    return message_id


def reset_mailbox(user: str) -> None:
    """Make ``user``'s mailbox clean: every message in every folder expunged, folders
    other than INBOX/Drafts/Sent/Trash deleted, ACLs granted to others removed."""
    conn = master_login(user)
    try:
        boxes = _list_mailboxes(conn)
        for flags, name in boxes:
            if "\\Noselect" in flags or "\\NonExistent" in flags:
                continue
            typ, data = conn.select(quote(name))
            if typ != "OK":
                continue
            if int(data[0] or 0):
                conn.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
                conn.expunge()
            conn.close()
        # children before parents
        for _, name in sorted(boxes, key=lambda b: b[1].count("/"), reverse=True):
            if name not in DEFAULT_FOLDERS:
                conn.delete(quote(name))
        for name in DEFAULT_FOLDERS:
            typ, data = conn.getacl(quote(name))
            if typ != "OK" or not data or not data[0]:
                continue
            # "<mailbox> id1 rights1 id2 rights2 ..."; the mailbox name may be quoted
            tokens = re.findall(rb'"(?:[^"\\]|\\.)*"|\S+', data[0])[1:]
            for ident in tokens[0::2]:
                who = ident.strip(b'"').decode()
                if who != user:
                    conn.deleteacl(quote(name), quote(who))
    finally:
        conn.logout()


def set_acl(owner: str, mailbox: str, grantee: str, rights: str) -> None:
    """Grant ``grantee`` RFC 4314 ``rights`` (e.g. "lrs", "+w", "" = remove) on
    ``owner``'s ``mailbox``, as the owner (through the service account).  The grantee then
    sees it as ``shared/<owner>/<mailbox>``."""
    conn = master_login(owner)
    try:
        if rights:
            typ, data = conn.setacl(quote(mailbox), quote(grantee), rights)
        else:
            typ, data = conn.deleteacl(quote(mailbox), quote(grantee))
        if typ != "OK":
            raise imaplib.IMAP4.error(f"SETACL {mailbox} {grantee} {rights!r}: {data}")
    finally:
        conn.logout()


def dav_request(
    method: str,
    path: str,
    user: str = SVC,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request to Radicale as ``user``; returns (status, body)."""
    token = base64.b64encode(f"{user}:{password(user)}".encode()).decode()
    hdrs = {"Authorization": f"Basic {token}", **(headers or {})}
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection(HOST, DAV_PORT, timeout=10)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def reset_dav(user: str) -> None:
    """Delete all of ``user``'s calendars and address books (its principal collection),
    as the service account.  Recreate the principal with MKCOL /<user>/ (or let the user
    log in once) before creating collections in it."""
    status, body = dav_request("DELETE", f"/{user}/")
    if status not in (200, 204, 404):
        raise RuntimeError(f"DELETE /{user}/ -> {status} {body[:200]!r}")


def _maildir(user: str, folder: str) -> Path:
    local, _, domain = _base_user(user).partition("@")
    base = MAIL_ROOT / domain / local / "Maildir"
    if folder.upper() == "INBOX":
        return base
    if "." in folder:  # Maildir++ uses "." on disk as the hierarchy separator
        raise ValueError(f"folder names with '.' are not supported here: {folder!r}")
    return base / ("." + folder.replace("/", "."))


_fill_seq = itertools.count()


def fill_maildir(user: str, folder: str, raw_messages: Iterable[bytes], flags: str = "") -> int:
    """Fast seeding for benchmarks (~20k msg/s): write messages straight into the
    Maildir (tmp/ then rename into cur/), owned by uid 5000.  ``flags`` are Maildir
    flag letters, e.g. "S" = \\Seen.  Dovecot indexes them on the next SELECT.
    Returns the number of messages written."""
    path = _maildir(user, folder)
    # Dovecot (uid 5000) must own every dir, or it cannot lock dovecot-uidlist and
    # silently shows an empty folder
    for d in [*reversed(path.parents[: len(path.relative_to(MAIL_ROOT).parts) - 1]), path]:
        if not d.exists():
            d.mkdir(mode=0o700)
            os.chown(d, VMAIL_UID, VMAIL_GID)
    for sub in ("tmp", "new", "cur"):
        if not (path / sub).exists():
            (path / sub).mkdir(mode=0o700)
            os.chown(path / sub, VMAIL_UID, VMAIL_GID)
    if folder.upper() != "INBOX":
        (path / "maildirfolder").touch()
        os.chown(path / "maildirfolder", VMAIL_UID, VMAIL_GID)
    tmp, cur = path / "tmp", path / "cur"
    pid, now, n = os.getpid(), int(time.time()), 0
    for raw in raw_messages:
        name = f"{now}.M{next(_fill_seq)}P{pid}.serversync-fill,S={len(raw)}:2,{flags}"
        with open(tmp / name, "xb") as f:
            f.write(raw)
            os.fchown(f.fileno(), VMAIL_UID, VMAIL_GID)
        os.rename(tmp / name, cur / name)
        n += 1
    return n
