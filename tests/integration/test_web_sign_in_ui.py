"""The admin UI's Microsoft sign-in card, driven by Playwright (Debian's headless Chromium)
against the real app under uvicorn on loopback and the Graph fake (device code flow).

The card shows the code and Microsoft's page, then updates itself (htmx polling) until the
sign-in is done or failed; readers see it without the button; a forged CSRF token is refused.
Screenshots land in the test's tmp dir (SERVERSYNC_UI_SHOTS=DIR keeps them elsewhere).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.tokens import Tokens
from serversync.store.crypto import Keyring, new_key
from serversync.store.db import Database
from serversync.web.app import create_app
from tests.fakes.graph_server import GraphServer

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP = "99999999-2222-3333-4444-555555555555"
DAN, EVE = "dan@contoso.test", "eve@contoso.test"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium: bash testservers/install-browser.sh")


@dataclass
class Site:
    url: str
    admin: str
    reader: str
    shots: Path
    graph: GraphServer
    database: str
    keyring: Keyring


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("signin-ui")
    url, keyring = f"sqlite:///{root}/ui.db", Keyring(new_key())
    graph = GraphServer().start()
    graph.add_app(APP, None)
    graph.add_user(DAN)
    graph.add_user(EVE)

    async def prepare() -> tuple[str, str]:
        db = Database(url, keyring)
        await db.migrate()
        await Services(db, wiring.PROBERS).apply(validate(Manifest, {
            "directory": [{"kind": "user", "key": "dan", "emails": [DAN]}],
            "profiles": [{"name": "eo-own", "kind": "exchange-online",
                          "credential_source": "mailbox", "tenant_id": graph.tenant,
                          "client_id": APP, "token_url": graph.token_url,
                          "api_url": graph.api_url, "allow_plaintext": True}],
            "mailboxes": [{"address": DAN, "owner": "dan", "profile": "eo-own",
                           "incoming": "server-side", "approval": "approved",
                           "allow_credentials": True}]}))
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
    yield Site(f"http://127.0.0.1:{port}", admin, reader, shots, graph, url, keyring)
    server.should_exit = True
    thread.join(10)
    graph.stop()
    assert not graph.http.errors, graph.http.errors


@pytest.fixture
async def page(site: Site) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = await browser.new_context(viewport={"width": 1360, "height": 900})
        yield await context.new_page()
        await browser.close()


async def sign_in(page: Any, site: Site, token: str) -> None:
    await page.goto(site.url + "/ui/login")
    await page.fill("input[name=token]", token)
    await page.click("button:has-text('Sign in')")
    await page.wait_for_selector("h1:has-text('Dashboard')")


async def stored_secret(site: Site) -> bool:
    async def read() -> bool:
        db = Database(site.database, site.keyring)
        try:
            async with db.transaction() as repo:
                return (await repo.get_mailbox(DAN)).secret is not None
        finally:
            await db.close()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result()


async def test_sign_in_card_shows_the_code_and_updates_itself(page: Any, site: Site) -> None:
    p = page
    await sign_in(p, site, site.reader)
    await p.goto(f"{site.url}/ui/mailboxes/{DAN}")
    card = p.locator("#sign-in")
    assert "Stored sign-in: none" in await card.inner_text()
    assert await card.locator("button").count() == 0  # a reader cannot start one
    forged = await p.request.post(f"{site.url}/ui/mailboxes/{DAN}/sign-in",
                                  form={"csrf": "forged"})
    assert forged.status == 403
    assert not [r for r in site.graph.requests if r.path.endswith("/devicecode")]

    await p.goto(site.url + "/ui/login")
    await sign_in(p, site, site.admin)
    await p.goto(f"{site.url}/ui/mailboxes/{DAN}")
    await card.locator("button:has-text('Sign in')").click()
    code = (await p.locator("#sign-in code.user-code").inner_text()).strip()
    assert code.startswith("F")
    link = p.locator("#sign-in a[href='https://microsoft.com/devicelogin']")
    assert await link.get_attribute("target") == "_blank"
    assert await p.locator("#sign-in").get_attribute("hx-trigger") == "every 2s"
    await p.screenshot(path=str(site.shots / "sign-in-pending.png"), full_page=True)

    site.graph.approve(code, DAN)  # the user signs in on Microsoft's page; nobody reloads
    await p.wait_for_selector("#sign-in[data-status=done]", timeout=20_000)
    text = await p.locator("#sign-in").inner_text()
    assert f"Signed in as {DAN}" in text and "Stored sign-in: yes" in text
    assert "started by ui:ops" in text
    assert await p.locator("#sign-in").get_attribute("hx-trigger") is None  # polling stopped
    assert await stored_secret(site)
    await p.screenshot(path=str(site.shots / "sign-in-done.png"), full_page=True)

    await p.locator("#sign-in button:has-text('Sign in')").click()  # again, and declined
    code = (await p.locator("#sign-in code.user-code").inner_text()).strip()
    site.graph.decline(code)
    await p.wait_for_selector("#sign-in[data-status=failed]", timeout=20_000)
    text = await p.locator("#sign-in").inner_text()
    assert "the user declined the sign-in" in text
    assert "Fix: start the sign-in again and accept the permissions" in text
    assert "Stored sign-in: yes" in text  # a refused sign-in keeps the earlier one
    await p.screenshot(path=str(site.shots / "sign-in-failed.png"), full_page=True)
