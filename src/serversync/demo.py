"""``make demo``: the real service on the embedded default, against the loopback servers.

The Makefile target starts the test servers (Dovecot, Postfix, Radicale on 127.0.0.1; see
``testservers/README.md``) — real servers rather than the pure-Python ones the issue
suggests, because the project installs them anyway and they behave like production. Then
this module:

1. makes a fresh state directory (``./demo-state``: its own SQLite database and key file);
2. seeds the servers for two demo users: frank (a user) and grace (the mailbox of the
   "sales" queue) get a few messages — one from a known contact, one from a stranger, one
   for the queue — and frank a calendar with an appointment and an address book with a
   contact;
3. configures a profile (own credentials), the directory and the two mailboxes with
   ``apply``, and runs Test & Enable on both;
4. runs ``serversync serve`` in this process (scheduler, IMAP IDLE push, API and admin UI),
   prints the admin UI's address and an admin token to sign in with, and a live summary
   as the first sync of every enabled channel completes.

It keeps serving until Ctrl-C, or exits after the first sync when ``DEMO_EXIT_AFTER_SYNC=1``
(the tests do that). ``DEMO_STATE`` and ``DEMO_PORT`` override the directory and the port.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import imaplib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serversync import wiring
from serversync.config import Settings
from serversync.core.access import Role
from serversync.core.errors import SyncError
from serversync.core.model import Channel
from serversync.manifest import Manifest, validate
from serversync.runtime import local
from serversync.service_commands import web_app_factory
from serversync.services import Services
from serversync.services.runs import Run
from serversync.services.tokens import Tokens

HOST = "127.0.0.1"
IMAP_PORT, SUBMISSION_PORT, MX_PORT, DAV_PORT = 10143, 10025, 10026, 15232
CA_FILE = Path(os.environ.get("SERVERSYNC_TESTSERVERS_ROOT", "/srv/serversync-test")) \
    / "dovecot" / "ssl" / "cert.pem"
FRANK, GRACE = "frank@example.test", "grace@example.test"
USERS = {FRANK: "frank-pw", GRACE: "grace-pw"}


def manifest() -> Manifest:
    secrets = {"env": "DEMO_FRANK_PASSWORD"}, {"env": "DEMO_GRACE_PASSWORD"}
    data: dict[str, Any] = {
        "settings": {"process_only_approved_mailboxes": True},
        "directory": [
            {"kind": "user", "key": "frank", "name": "Frank Fisher", "emails": [FRANK],
             "tracking_rule": "all"},
            {"kind": "queue", "key": "sales", "name": "Sales", "emails": [GRACE],
             "tracking_rule": "all"},
            {"kind": "contact", "key": "c-1", "name": "Dana Customer",
             "emails": ["dana@customer.example"]},
            {"kind": "account", "key": "a-1", "name": "Customer Ltd",
             "emails": ["info@customer.example"]},
        ],
        "profiles": [{
            "name": "demo", "kind": "imap", "description": "loopback test servers",
            "incoming": {"host": HOST, "port": IMAP_PORT, "tls": "starttls"},
            "outgoing": {"host": HOST, "port": SUBMISSION_PORT, "tls": "starttls"},
            "credential_source": "mailbox", "dav_url": f"http://{HOST}:{DAV_PORT}/",
            "allow_plaintext": True, "ca_file": str(CA_FILE), "min_polling_interval_s": 60,
            "alert_owner": FRANK,
        }],
        "mailboxes": [
            {"address": FRANK, "owner": "frank", "profile": "demo", "incoming": "server-side",
             "outgoing": "server-side", "act": "server-side", "approval": "approved",
             "allow_credentials": True, "secret": secrets[0], "tracking_rule": "all"},
            {"address": GRACE, "owner": "sales", "owner_kind": "queue", "profile": "demo",
             "incoming": "server-side", "outgoing": "server-side", "approval": "approved",
             "allow_credentials": True, "secret": secrets[1], "tracking_rule": "all"},
        ],
    }
    return validate(Manifest, data)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- seeding the servers

def _imap(user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(HOST, IMAP_PORT, timeout=10)
    conn.starttls(ssl.create_default_context(cafile=str(CA_FILE)))
    conn.login(user, USERS[user])
    return conn


def empty_inbox(user: str) -> None:
    conn = _imap(user)
    try:
        conn.select("INBOX")
        conn.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
        conn.expunge()
    except imaplib.IMAP4.error:
        pass  # an empty INBOX has no 1:*
    finally:
        conn.logout()


def inbox_count(user: str) -> int:
    conn = _imap(user)
    try:
        status, data = conn.select("INBOX", readonly=True)
        return int(data[0] or 0) if status == "OK" else 0
    finally:
        conn.logout()


def message(sender: str, to: str, subject: str, body: str) -> bytes:
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {stamp}\r\n"
            f"Message-ID: <{time.time_ns()}.demo@customer.example>\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()


def send_mail(mails: Sequence[tuple[str, str, bytes]]) -> None:
    """As mail from outside: Postfix's MX port, no AUTH."""
    with smtplib.SMTP(HOST, MX_PORT, timeout=10) as smtp:
        for sender, to, raw in mails:
            smtp.sendmail(sender, [to], raw)


def dav(method: str, path: str, user: str, body: str = "", content_type: str = "") -> int:
    token = base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    conn = http.client.HTTPConnection(HOST, DAV_PORT, timeout=10)
    try:
        conn.request(method, path, body=body.encode() or None, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def seed_dav(user: str) -> None:
    home = f"/{user}/"
    dav("DELETE", home + "demo-calendar/", user)
    dav("DELETE", home + "demo-contacts/", user)
    dav("PROPFIND", home, user)  # Radicale creates the principal on first use
    dav("MKCALENDAR", home + "demo-calendar/", user)
    dav("MKCOL", home + "demo-contacts/", user, (
        '<?xml version="1.0"?><D:mkcol xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:carddav">'
        "<D:set><D:prop><D:resourcetype><D:collection/><C:addressbook/></D:resourcetype>"
        "</D:prop></D:set></D:mkcol>"), "application/xml")
    start = time.strftime("%Y%m%dT100000Z", time.gmtime(time.time() + 86400))
    end = time.strftime("%Y%m%dT110000Z", time.gmtime(time.time() + 86400))
    dav("PUT", home + "demo-calendar/kickoff.ics", user, (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//serversync demo//EN\r\nBEGIN:VEVENT\r\n"
        f"UID:demo-kickoff@example.test\r\nDTSTAMP:{start}\r\nDTSTART:{start}\r\n"
        f"DTEND:{end}\r\nSUMMARY:Kick-off with Customer Ltd\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"),
        "text/calendar")
    dav("PUT", home + "demo-contacts/dana.vcf", user, (
        "BEGIN:VCARD\r\nVERSION:3.0\r\nUID:demo-dana@example.test\r\nFN:Dana Customer\r\n"
        "N:Customer;Dana;;;\r\nEMAIL:dana@customer.example\r\nEND:VCARD\r\n"), "text/vcard")


def seed_servers() -> int:
    """Fresh INBOXes with a few messages, a calendar and an address book; returns messages."""
    for user in USERS:
        empty_inbox(user)
    mails = [
        ("dana@customer.example", FRANK,
         message("Dana Customer <dana@customer.example>", FRANK, "Our renewal",
                 "Hi Frank, can we talk about the renewal next week? Dana")),
        ("stranger@elsewhere.example", FRANK,
         message("Someone <stranger@elsewhere.example>", FRANK, "Hello",
                 "A message from someone not in the directory.")),
        ("info@customer.example", GRACE,
         message("Customer Ltd <info@customer.example>", GRACE, "Quote request",
                 "Please send us a quote for 20 seats.")),
    ]
    send_mail(mails)
    deadline = time.monotonic() + 20
    while sum(inbox_count(u) for u in USERS) < len(mails):
        if time.monotonic() > deadline:
            raise SystemExit("demo: the test servers did not deliver the seed mail; "
                             "run `make servers` and check testservers/README.md")
        time.sleep(0.2)
    seed_dav(FRANK)
    return len(mails)


# ---------------------------------------------------------------- the demo

def free_port(preferred: int) -> int:
    """``preferred`` when it is free, else any free port (0 = any)."""
    with socket.socket() as probe:
        try:
            probe.bind((HOST, preferred))
        except OSError:
            probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def say(text: str) -> None:
    print(text, flush=True)


def summary(runs: Sequence[Run]) -> list[str]:
    lines = []
    for run in sorted(runs, key=lambda r: (r.mailbox, r.channel.value)):
        outcome = run.outcome.value if run.outcome else "running"
        line = (f"  {run.mailbox:<22} {run.channel.value:<9} {outcome:<9} "
                f"{run.items:>3} items {run.failures:>2} failures  {run.detail}")
        if run.error:
            line += f"  [{run.error_code}] {run.error}"
        lines.append(line.rstrip())
    return lines


def fresh_state(state: Path) -> None:
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)


async def demo(state: Path, port: int, exit_after_sync: bool) -> int:
    await asyncio.to_thread(fresh_state, state)
    os.environ.setdefault("DEMO_FRANK_PASSWORD", USERS[FRANK])
    os.environ.setdefault("DEMO_GRACE_PASSWORD", USERS[GRACE])
    settings = Settings(database_url=f"sqlite:///{state / 'serversync.db'}",
                        key_file=state / "serversync.key")
    say(f"demo: state in {state}/ (SQLite + key file)")
    seeded = await asyncio.to_thread(seed_servers)
    say(f"demo: seeded {seeded} messages for {FRANK} and {GRACE} (sales queue), "
        f"a calendar and an address book for {FRANK}")
    services: Services = await wiring.services(settings)
    try:
        report = await services.apply(manifest())
        say(f"demo: configured {', '.join(report.created)}")
        expected: set[tuple[str, Channel]] = set()
        for address in USERS:
            test = await services.test_enable(address)
            for result in test.results:
                mark = "ok " if result.ok else "FAIL"
                say(f"demo: Test & Enable {address} {result.channel.value:<8} {mark} "
                    f"{result.summary}")
                if result.ok:
                    expected.add((address, result.channel))
        token = await Tokens(services.db).create("demo-admin", Role.ADMIN)
        first: dict[tuple[str, Channel], Run] = {}
        done = asyncio.Event()

        def on_run(run: Run) -> None:
            first.setdefault((run.mailbox, run.channel), run)
            if expected <= first.keys() and not done.is_set():
                done.set()

        factory = web_app_factory()
        runtime = local.build(services, options=local.ServeOptions(port=port, grace_s=10),
                              pushers=wiring.PUSHERS, app_factory=factory, on_run=on_run)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runtime.stop)
        serving = asyncio.create_task(runtime.run())
        await runtime.started.wait()
        if runtime.app is not None:
            say(f"demo: admin UI and API at http://{HOST}:{port}/  (OpenAPI: /docs)")
            say(f"demo: sign in with the admin token {token.value}")
        else:
            say("demo: the web part is not installed; running headless")
        if not expected:
            say("demo: no channel passed Test & Enable; see the alerts above")
        try:
            await asyncio.wait_for(done.wait(), 120)
        except TimeoutError:
            say("demo: the first sync did not complete within 120 s")
        say("demo: first sync complete:")
        for line in summary(list(first.values())):
            say(line)
        stats = await runtime.runlog.stats(services.clock().replace(minute=0, second=0))
        say(f"demo: {stats['totals']['items']} items synced, {stats['totals']['failures']} "
            f"quarantined; mailboxes by status: {stats['mailboxes_by_status']}")
        failed = [r for r in first.values() if r.outcome is not None and r.error]
        if exit_after_sync:
            runtime.stop()
        else:
            say("demo: serving; new mail to frank@example.test is tracked within seconds "
                "(IMAP IDLE). Ctrl-C stops.")
        await serving
        return 1 if failed or not expected <= first.keys() else 0
    finally:
        await services.db.close()


def main() -> None:
    state = Path(os.environ.get("DEMO_STATE", "demo-state")).resolve()
    port = free_port(int(os.environ.get("DEMO_PORT", "8080")))
    try:
        code = asyncio.run(demo(state, port, os.environ.get("DEMO_EXIT_AFTER_SYNC") == "1"))
    except SyncError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
