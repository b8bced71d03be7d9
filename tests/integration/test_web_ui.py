"""The admin UI end to end: Playwright drives Debian's headless Chromium (/usr/bin/chromium)
against the real app served by uvicorn on loopback, with the real Dovecot behind Test & Enable
(heidi, this suite's user). Screenshots land in the test's tmp dir (SERVERSYNC_UI_SHOTS=DIR
keeps them somewhere else, for looking at them)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from serversync import wiring
from serversync.core.access import Role
from serversync.core.model import Alert, Channel, Severity
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.tokens import Tokens
from serversync.store.crypto import Keyring, new_key
from serversync.store.db import Database
from serversync.store.incoming import IncomingStore
from serversync.web.app import create_app
from tests import testservers as ts

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEIDI = "heidi@example.test"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium: bash testservers/install-browser.sh")


@dataclass
class Site:
    url: str
    admin: str
    reader: str
    shots: Path
    database: str  # the app's SQLite database, for tests that prepare data directly
    keyring: Keyring


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("ui")
    url, keyring = f"sqlite:///{root}/ui.db", Keyring(new_key())

    async def prepare() -> tuple[str, str]:
        db = Database(url, keyring)
        await db.migrate()
        tokens = Tokens(db)
        admin = (await tokens.create("ops", Role.ADMIN)).value
        reader = (await tokens.create("auditor", Role.READER)).value
        await db.close()
        return admin, reader
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        admin, reader = pool.submit(asyncio.run, prepare()).result()
    app = create_app(Services(Database(url, keyring), wiring.PROBERS))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    shots = Path(os.environ.get("SERVERSYNC_UI_SHOTS") or root)
    shots.mkdir(parents=True, exist_ok=True)
    yield Site(f"http://127.0.0.1:{port}", admin, reader, shots, url, keyring)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
async def page(site: Site) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = await browser.new_context(viewport={"width": 1360, "height": 900})
        yield await context.new_page()
        await browser.close()


async def sign_in(page: Any, site: Site, token: str) -> None:
    p = page
    await p.goto(site.url + "/ui/")
    assert p.url.endswith("/ui/login")
    await p.fill("input[name=token]", token)
    await p.click("button:has-text('Sign in')")


async def test_sign_in_refuses_a_wrong_token_and_accepts_a_real_one(page: Any,
                                                                    site: Site) -> None:
    p = page
    await sign_in(p, site, "sst_not-a-token")
    await p.wait_for_selector("text=That token is unknown or revoked")
    await p.fill("input[name=token]", site.admin)
    await p.click("button:has-text('Sign in')")
    await p.wait_for_selector("h1:has-text('Dashboard')")
    assert "ops" in await p.inner_text("header .who")
    await p.click("button:has-text('Sign out')")  # a reader may sign out
    await p.wait_for_selector("h1:has-text('Sign in')")
    await p.goto(site.url + "/ui/mailboxes")
    assert p.url.endswith("/ui/login")  # the session ended


@pytest.mark.usefixtures("test_servers")
async def test_add_profile_and_mailbox_then_test_enable_shows_the_failure(
        page: Any, site: Site) -> None:
    p = page
    await sign_in(p, site, site.admin)
    await p.click("nav >> text=Profiles")
    form = "#profile-form"
    await p.fill(f"{form} input[name=name]", "dovecot")
    await p.select_option(f"{form} select[name=kind]", "imap")
    await p.fill(f"{form} input[name=incoming_host]", ts.HOST)
    await p.fill(f"{form} input[name=incoming_port]", str(ts.IMAPS_PORT))
    await p.select_option(f"{form} select[name=credential_source]", "mailbox")
    await p.fill(f"{form} input[name=ca_file]", str(ts.CA_FILE))
    await p.click("button:has-text('Create profile')")
    await p.wait_for_selector("h1:has-text('Profile dovecot')")
    assert "signs in with its own credentials" in await p.inner_text("#reach")

    await p.click("nav >> text=Mailboxes")
    form = "#mailbox-form"
    await p.fill(f"{form} input[name=address]", HEIDI)
    await p.fill(f"{form} input[name=name]", "Heidi")
    await p.select_option(f"{form} select[name=incoming]", "server-side")
    await p.check(f"{form} input[name=allow_credentials]")
    await p.fill(f"{form} input[name=username]", HEIDI)
    await p.fill(f"{form} input[name=secret]", "definitely-wrong")
    await p.click("button:has-text('Create mailbox')")
    row = "tbody.mailbox[data-address='heidi@example.test']"
    await p.wait_for_selector(row)
    assert "definitely-wrong" not in await p.content()

    await p.click(f"{row} button:has-text('Approve')")
    await p.wait_for_selector(f"{row} .note:has-text('approved')")
    await p.click(f"{row} button:has-text('Test & Enable')")
    alert = await p.wait_for_selector(f"{row} tr.alert-row", timeout=30_000)
    text = await alert.inner_text()
    assert "auth-failed" in text and "incoming" in text
    results = await p.inner_text(f"{row} ul.results")
    assert results.startswith("✘ incoming")
    assert "failure" in await p.inner_text(f"{row} td.ch")
    await p.screenshot(path=str(site.shots / "mailboxes.png"), full_page=True)

    await p.click("nav >> text=Alerts")
    wall = await p.inner_text("#alerts")
    assert HEIDI in wall and "auth-failed" in wall


async def test_dashboard_renders_charts_and_reader_is_read_only(page: Any,
                                                                site: Site) -> None:
    p = page
    await sign_in(p, site, site.reader)
    await p.wait_for_selector("h1:has-text('Dashboard')")
    for chart in ("#chart-status", "#chart-latency", "#chart-items", "#chart-runs"):
        assert await p.locator(f"{chart} svg").count() == 1
    assert await p.locator("#chart-status svg rect").count() >= 1
    await p.screenshot(path=str(site.shots / "dashboard.png"), full_page=True)
    await p.click("nav >> text=Mailboxes")
    assert await p.locator("button:has-text('Test & Enable')").count() == 0
    assert await p.locator("#mailbox-form").count() == 0


async def test_quarantine_page_retries_and_discards_with_csrf(page: Any, site: Site) -> None:
    """Two quarantined messages (rows as the incoming job writes them, with its alert; the
    run itself is covered by test_quarantine.py): linked from the alert, retried and
    discarded with the buttons, read-only for a reader, refused without the CSRF token."""
    address = "quarantine-ui@example.test"
    db = Database(site.database, site.keyring)
    services = Services(db, wiring.PROBERS)
    await services.apply(validate(Manifest, {
        "directory": [{"kind": "user", "key": "qui", "emails": [address]}],
        "profiles": [{"name": "quarantine-ui", "kind": "imap", "credential_source": "mailbox",
                      "incoming": {"host": ts.HOST, "port": ts.IMAPS_PORT}}],
        "mailboxes": [{"address": address, "owner": "qui", "profile": "quarantine-ui",
                       "incoming": "server-side", "approval": "approved",
                       "tracking_rule": "all"}]}))
    now = dt.datetime.now(dt.UTC)
    async with db.transaction() as repo:
        mailbox = await repo.get_mailbox(address)
        assert mailbox.id is not None
        store = IncomingStore(repo.session)
        for n in (1, 2):
            raw = (f"From: Olga <olga@customer.test>\r\nTo: {address}\r\nSubject: stuck {n}\r\n"
                   f"Message-ID: <stuck-{n}@ui.test>\r\n\r\nbody\r\n").encode()
            await store.quarantine(mailbox.id, "INBOX", f"7:{n}", raw, "store-refused",
                                   "the database refused it: IntegrityError: test", now)
        await repo.add_alert(Alert(Severity.WARNING, "quarantined", f"2 message(s) in INBOX of "
                                   f"{address} were quarantined", "fix the cause, then retry",
                                   mailbox=address, channel=Channel.INCOMING, created_at=now))
        ids = [q.id for q in await store.quarantined(mailbox.id)]
    await db.close()
    first, second = (f"#quarantine tr[data-id='{i}']" for i in ids)

    p = page
    await sign_in(p, site, site.reader)
    await p.wait_for_selector("h1:has-text('Dashboard')")
    await p.click("nav >> text=Quarantine")
    await p.wait_for_selector(first)
    assert "stuck" not in await p.inner_text("#quarantine")  # subjects: on the detail page
    assert await p.locator("#quarantine button").count() == 0  # a reader only reads
    await p.click(f"{first} td >> nth=0 >> a")
    await p.wait_for_selector("h1:has-text('Quarantined message')")
    assert "stuck 1" in await p.inner_text("main")
    await p.click("button:has-text('Sign out')")  # a reader may sign out
    await p.wait_for_selector("h1:has-text('Sign in')")

    await sign_in(p, site, site.admin)
    await p.click("nav >> text=Alerts")
    await p.click(f"#alerts tr:has-text('{address}') >> text=Open the quarantine")
    await p.wait_for_selector(f"h1:has-text('{address}')")
    assert "mailbox=" in p.url
    # a form post without the session's CSRF token changes nothing
    forged = await p.request.post(f"{site.url}/ui/quarantine/{ids[0]}/retry",
                                  form={"csrf": "forged"})
    assert forged.status == 403 and "security token" in await forged.text()

    await p.click(f"{first} button:has-text('Retry')")
    await p.wait_for_selector(f"{first} .note:has-text('tracked as email activity')")
    assert "tracked" in await p.inner_text(f"{first} td.status")
    assert "ui:ops" in await p.inner_text(f"{first} td.status")
    assert await p.locator(f"{first} button").count() == 0
    p.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await p.click(f"{second} button:has-text('Discard')")
    await p.wait_for_selector(f"{second} .note:has-text('discarded')")
    await p.screenshot(path=str(site.shots / "quarantine.png"), full_page=True)

    await p.goto(f"{site.url}/ui/quarantine?mailbox={address}")
    assert "Nothing in quarantine" in await p.inner_text("#quarantine")
    await p.goto(f"{site.url}/ui/quarantine?mailbox={address}&all=true")
    assert "discarded" in await p.inner_text(second)
    await p.click("nav >> text=Alerts")
    assert "were quarantined" not in await p.inner_text("#alerts")  # resolved: none left
