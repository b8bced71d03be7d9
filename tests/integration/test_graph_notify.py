"""Graph change notifications: subscriptions kept by `services.graph_subscriptions` against
the loopback Graph (`tests.fakes.graph_server`), and the receiver `web.graph_notify`.

Verified only against that fake and Microsoft's documented shapes (validation handshake:
``validationToken`` echoed as text/plain; notifications ``{"value": [{subscriptionId,
clientState, …}]}``).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from serversync.connectors import graph
from serversync.core.model import Channel
from serversync.services import Services
from serversync.services.graph_subscriptions import GraphSubscriptions, state_hash
from serversync.services.runs import RunLog
from serversync.web.app import create_app
from tests.fakes.graph_server import GraphServer
from tests.integration.test_graph import APP, BOB, SECRET, setup

DAVE = "dave@contoso.test"
URL = "https://sync.example.test/graph/notify"


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, SECRET)
    fake.add_user(BOB)
    fake.add_user(DAVE)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


@pytest.fixture
async def woken(services: Services) -> list[tuple[str, Channel]]:
    return []


@pytest.fixture
async def client(services: Services, woken: list[tuple[str, Channel]],
                 ) -> AsyncIterator[httpx.AsyncClient]:
    runlog = RunLog(services.db, services.clock)
    runlog.wakers.append(lambda address, channel: woken.append((address, channel)))
    app = create_app(services, runlog=runlog)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://sync") as http:
        yield http


async def enabled(services: Services, server: GraphServer, *addresses: str) -> None:
    await setup(services, server, *addresses, act=False)
    async with services.db.transaction() as repo:
        for address in addresses:
            await repo.set_channel(address, Channel.INCOMING, enabled=True)


def wire(server: GraphServer, method: str | None = None) -> list[Any]:
    return [r for r in server.requests if r.path.startswith("/v1.0/subscriptions")
            and (method is None or r.method == method)]


def notification(sub_id: str, client_state: str) -> dict[str, Any]:
    return {"value": [{
        "subscriptionId": sub_id, "clientState": client_state, "changeType": "created",
        "subscriptionExpirationDateTime": "2026-12-06T18:23:45.9356913Z",
        "tenantId": "contoso-tenant", "resource": f"Users/{BOB}/Messages/AAMkAG",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": "AAMkAG"}}]}


async def test_validation_handshake_echoes_the_token(client: httpx.AsyncClient) -> None:
    token = "Validation: Testing client application reachability for subscription Request-Id: " \
            "e4f8d5b6-1a2b-4c3d-9e8f-0a1b2c3d4e5f"
    response = await client.post("/graph/notify?validationToken=" + urllib.parse.quote(token),
                                 headers={"Content-Type": "text/plain"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == token


async def test_notifications_are_checked_and_wake_the_incoming_channel(
        services: Services, server: GraphServer, client: httpx.AsyncClient,
        woken: list[tuple[str, Channel]]) -> None:
    await enabled(services, server, BOB)
    report = await GraphSubscriptions(services.db, services.clock).ensure(URL)
    assert report.created == [BOB] and not report.failed
    [create] = wire(server, "POST")
    sent = json.loads(create.body)
    state, [held] = sent["clientState"], await GraphSubscriptions(services.db).held()
    assert held.client_state_hash == state_hash(state)
    assert state not in repr(held)  # only the hash is kept

    forged = await client.post("/graph/notify", json=notification(held.subscription_id,
                                                                  "guessed"))
    unknown = await client.post("/graph/notify", json=notification("SUB-other", state))
    garbage = await client.post("/graph/notify", content=b"not json")
    assert [forged.status_code, unknown.status_code, garbage.status_code] == [403, 403, 403]
    assert woken == []
    assert all(s.why != "requested" for s in await RunLog(services.db).schedules(BOB))

    good = await client.post("/graph/notify", json=notification(held.subscription_id, state))
    assert good.status_code == 202
    assert woken == [(BOB, Channel.INCOMING)]
    [incoming] = [s for s in await RunLog(services.db).schedules(BOB)
                  if s.channel is Channel.INCOMING]
    assert incoming.next_run_at is not None and incoming.next_run_at <= services.clock()


async def test_ensure_creates_renews_recreates_and_deletes(services: Services,
                                                           server: GraphServer) -> None:
    await enabled(services, server, BOB, DAVE)
    keeper = GraphSubscriptions(services.db, services.clock)
    first = await keeper.ensure(URL)
    assert sorted(first.created) == [BOB, DAVE] and not first.failed
    creates = [json.loads(r.body) for r in wire(server, "POST")]
    assert sorted(c["resource"] for c in creates) == [
        f"users/{BOB}/mailFolders('inbox')/messages", f"users/{DAVE}/mailFolders('inbox')/messages"]
    for body in creates:
        assert body["notificationUrl"] == URL and body["changeType"] == "created"
        assert len(body["clientState"]) >= 32
    assert len({c["clientState"] for c in creates}) == 2
    held = {s.mailbox: s for s in await keeper.held()}
    assert {s.subscription_id for s in held.values()} == set(server.subscriptions)

    # Nothing is due: no request at all.
    before = len(server.requests)
    again = await keeper.ensure(URL)
    assert (again.created, again.renewed, again.deleted) == ([], [], [])
    assert len(server.requests) == before

    # Within the margin: renewed in place (PATCH expirationDateTime only).
    due = GraphSubscriptions(services.db, services.clock, margin=graph.MAIL_SUBSCRIPTION_MAX)
    renewed = await due.ensure(URL)
    assert sorted(renewed.renewed) == [BOB, DAVE]
    patches = wire(server, "PATCH")
    assert sorted(r.path for r in patches) == sorted(
        f"/v1.0/subscriptions/{s.subscription_id}" for s in held.values())
    assert all(list(json.loads(r.body)) == ["expirationDateTime"] for r in patches)
    after = {s.mailbox: s for s in await keeper.held()}
    assert all(after[a].expires_at >= held[a].expires_at for a in held)
    assert after[BOB].client_state_hash == held[BOB].client_state_hash

    # Graph forgot one: renewing answers 404, and a new subscription is made.
    del server.subscriptions[held[BOB].subscription_id]
    recreated = await due.ensure(URL)
    assert recreated.created == [BOB] and recreated.renewed == [DAVE]
    new_bob = {s.mailbox: s for s in await keeper.held()}[BOB]
    assert new_bob.subscription_id != held[BOB].subscription_id
    assert new_bob.subscription_id in server.subscriptions

    # A mailbox no longer on an Exchange Online profile: its subscription is deleted.
    async with services.db.transaction() as repo:
        await repo.delete_mailbox(DAVE)
    gone = await keeper.ensure(URL)
    assert gone.deleted == [DAVE]
    [delete] = wire(server, "DELETE")
    assert delete.path == f"/v1.0/subscriptions/{held[DAVE].subscription_id}"
    assert held[DAVE].subscription_id not in server.subscriptions
    assert [s.mailbox for s in await keeper.held()] == [BOB]
    for request in server.requests:  # the clientState never travels in a URL
        assert all(c["clientState"] not in request.path for c in creates)
