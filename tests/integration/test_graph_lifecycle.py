"""Graph lifecycle notifications: the lifecycle URL on every subscription (validated by the
loopback Graph against our receiver), and ``reauthorizationRequired``, ``subscriptionRemoved``
and ``missed`` posted to ``/graph/lifecycle`` and acted on.

Verified only against `tests.fakes.graph_server` and the shapes of Microsoft's "Reduce
missing subscriptions and change notifications" page (``tests/fixtures/graph/lifecycle-*``).
Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serversync.core.model import Channel, Severity
from serversync.services import Services
from serversync.services.graph_subscriptions import GraphSubscriptions, lifecycle_url_for
from serversync.services.runs import RunLog
from serversync.store.exchange import GraphSubscriptions as SubscriptionStore
from serversync.web.app import create_app
from tests.fakes.graph_server import GraphServer
from tests.integration.test_graph import APP, BOB, SECRET, setup

DAVE = "dave@contoso.test"
URL = "https://sync.example.test/graph/notify"
LIFECYCLE = "https://sync.example.test/graph/lifecycle"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graph"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    assert data["source"].startswith("https://learn.microsoft.com/")
    return data


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
def woken() -> list[tuple[str, Channel]]:
    return []


@pytest.fixture
async def client(services: Services, server: GraphServer, woken: list[tuple[str, Channel]],
                 ) -> AsyncIterator[httpx.AsyncClient]:
    """Our web app over ASGI; the fake Graph validates subscription URLs against it."""
    runlog = RunLog(services.db, services.clock)
    runlog.wakers.append(lambda address, channel: woken.append((address, channel)))
    app = create_app(services, runlog=runlog)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://sync") as http:
        def validate(url: str, token: str) -> tuple[int, str, str]:
            # Runs on the fake's thread; the test's event loop serves the ASGI app meanwhile.
            path = urllib.parse.urlsplit(url).path
            answer = asyncio.run_coroutine_threadsafe(
                http.post(path + "?validationToken=" + urllib.parse.quote(token)), loop
            ).result(10)
            return answer.status_code, answer.headers.get("content-type", ""), answer.text
        server.validator = validate
        yield http
        server.validator = None


async def subscribed(services: Services, server: GraphServer, *addresses: str,
                     **kwargs: Any) -> dict[str, Any]:
    await setup(services, server, *addresses, act=False)
    async with services.db.transaction() as repo:
        for address in addresses:
            await repo.set_channel(address, Channel.INCOMING, enabled=True)
    report = await GraphSubscriptions(services.db, services.clock, **kwargs).ensure(URL)
    assert sorted(report.created) == sorted(addresses) and not report.failed, report
    return {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}


def graph_calls(server: GraphServer, since: int = 0) -> list[Any]:
    return [r for r in server.requests[since:] if r.path.startswith("/v1.0/subscriptions")]


async def alerts(services: Services, address: str) -> list[Any]:
    return await services.alerts(mailbox=address)


def test_the_lifecycle_url_sits_beside_the_notification_url() -> None:
    assert lifecycle_url_for(URL) == LIFECYCLE
    assert lifecycle_url_for("https://h.test/base/graph/notify?x=1") == (
        "https://h.test/base/graph/lifecycle?x=1")
    # A proxy path we cannot map: the same URL, which Graph allows (our routes take both).
    assert lifecycle_url_for("https://h.test/hooks/ms") == "https://h.test/hooks/ms"


async def test_subscriptions_carry_a_validated_lifecycle_url(
        services: Services, server: GraphServer, client: httpx.AsyncClient) -> None:
    held = await subscribed(services, server, BOB)
    [create] = [r for r in graph_calls(server) if r.method == "POST"]
    body = json.loads(create.body)
    documented = fixture("subscription-create-lifecycle-request.json")["body"]
    assert list(body) == list(documented)
    assert body["notificationUrl"] == URL and body["lifecycleNotificationUrl"] == LIFECYCLE
    assert body["changeType"] == "created" and body["resource"] == documented["resource"]
    # Graph validated both URLs against our receiver before creating it.
    assert [url for url, _ in server.validations] == [URL, LIFECYCLE]
    assert held[BOB].lifecycle_url == LIFECYCLE
    assert server.subscriptions[held[BOB].subscription_id]["lifecycleNotificationUrl"] == \
        LIFECYCLE

    # A receiver that does not answer the handshake: Graph refuses, we report it.
    server.validator = lambda url, token: (200, "text/plain", "something else")
    async with services.db.transaction() as repo:
        await SubscriptionStore(repo.session).forget(BOB)
    failed = await GraphSubscriptions(services.db, services.clock).ensure(URL)
    assert failed.created == []
    assert "Subscription validation request failed" in failed.failed[BOB]


async def test_subscriptions_made_without_a_lifecycle_url_are_replaced(
        services: Services, server: GraphServer, client: httpx.AsyncClient) -> None:
    held = await subscribed(services, server, BOB)
    old = held[BOB]
    async with services.db.transaction() as repo:  # as left by a release before 0012
        await SubscriptionStore(repo.session).put(
            dataclasses.replace(old, lifecycle_url=None), services.clock())
    report = await GraphSubscriptions(services.db, services.clock).ensure(URL)
    assert report.deleted == [BOB] and report.created == [BOB]
    new = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}[BOB]
    assert new.lifecycle_url == LIFECYCLE and new.subscription_id != old.subscription_id
    assert old.subscription_id not in server.subscriptions


async def test_lifecycle_validation_handshake(client: httpx.AsyncClient) -> None:
    documented = fixture("notification-url-validation.json")
    token = documented["query"]["validationToken"]
    response = await client.post("/graph/lifecycle?validationToken=" + urllib.parse.quote(token))
    assert response.status_code == documented["status"]
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == documented["response_text"]


async def test_reauthorization_required_reauthorizes_at_once(
        services: Services, server: GraphServer, client: httpx.AsyncClient,
        woken: list[tuple[str, Channel]]) -> None:
    held = await subscribed(services, server, BOB)
    sub_id = held[BOB].subscription_id
    payload = server.lifecycle_notification(sub_id, "reauthorizationRequired")
    documented = fixture("lifecycle-reauthorization-required.json")["body"]
    assert set(payload["value"][0]) == set(documented["value"][0])
    before = len(server.requests)

    response = await client.post("/graph/lifecycle", json=payload)
    assert response.status_code == 202
    [call] = graph_calls(server, before)
    assert (call.method, call.path, call.body) == (
        "POST", f"/v1.0/subscriptions/{sub_id}/reauthorize", b"")
    assert fixture("subscription-reauthorize.json")["status"] == 204
    assert server.reauthorized == [sub_id]
    after = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}[BOB]
    assert after.expires_at == held[BOB].expires_at  # not left marked due
    assert woken == []  # nothing was missed: no sync
    assert await alerts(services, BOB) == []  # routine: a log line, not an alert


async def test_reauthorization_near_expiry_renews_instead(
        services: Services, server: GraphServer, client: httpx.AsyncClient) -> None:
    held = await subscribed(services, server, BOB, lifetime=dt.timedelta(hours=2))
    before = len(server.requests)
    response = await client.post("/graph/lifecycle", json=server.lifecycle_notification(
        held[BOB].subscription_id, "reauthorizationRequired"))
    assert response.status_code == 202
    [call] = graph_calls(server, before)
    assert call.method == "PATCH" and list(json.loads(call.body)) == ["expirationDateTime"]
    after = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}[BOB]
    assert after.expires_at > held[BOB].expires_at


async def test_subscription_removed_is_recreated_and_synced(
        services: Services, server: GraphServer, client: httpx.AsyncClient,
        woken: list[tuple[str, Channel]]) -> None:
    held = await subscribed(services, server, BOB, DAVE)
    old = held[BOB].subscription_id
    payload = server.lifecycle_notification(old, "subscriptionRemoved")
    assert set(payload["value"][0]) == set(
        fixture("lifecycle-subscription-removed.json")["body"]["value"][0])
    del server.subscriptions[old]  # Graph removed it

    response = await client.post("/graph/lifecycle", json=payload)
    assert response.status_code == 202
    new = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}
    assert new[BOB].subscription_id != old and new[BOB].subscription_id in server.subscriptions
    assert new[BOB].lifecycle_url == LIFECYCLE
    assert new[DAVE] == held[DAVE]  # the other mailbox is untouched
    assert (BOB, Channel.INCOMING) in woken and (DAVE, Channel.INCOMING) not in woken
    [incoming] = [s for s in await RunLog(services.db).schedules(BOB)
                  if s.channel is Channel.INCOMING]
    assert incoming.next_run_at is not None and incoming.next_run_at <= services.clock()
    [alert] = await alerts(services, BOB)
    assert alert.severity is Severity.INFO and alert.code == "graph-subscription-removed"

    # The removed subscription's notifications are refused from now on.
    stale = await client.post("/graph/lifecycle", json=payload)
    assert stale.status_code == 403


async def test_missed_runs_a_delta_sync_at_once(
        services: Services, server: GraphServer, client: httpx.AsyncClient,
        woken: list[tuple[str, Channel]]) -> None:
    held = await subscribed(services, server, BOB)
    payload = server.lifecycle_notification(held[BOB].subscription_id, "missed")
    assert set(payload["value"][0]) == set(fixture("lifecycle-missed.json")["body"]["value"][0])
    before = len(server.requests)
    response = await client.post("/graph/lifecycle", json=payload)
    assert response.status_code == 202
    assert woken == [(BOB, Channel.INCOMING)]
    assert graph_calls(server, before) == []  # the subscription itself is fine
    again = await client.post("/graph/lifecycle", json=payload)
    assert again.status_code == 202
    [alert] = await alerts(services, BOB)  # said once, not per event
    assert alert.severity is Severity.INFO and alert.code == "graph-notifications-missed"


async def test_forged_unknown_and_malformed_are_refused(
        services: Services, server: GraphServer, client: httpx.AsyncClient,
        woken: list[tuple[str, Channel]]) -> None:
    held = await subscribed(services, server, BOB)
    sub_id = held[BOB].subscription_id
    genuine = server.lifecycle_notification(sub_id, "subscriptionRemoved")
    forged = json.loads(json.dumps(genuine))
    forged["value"][0]["clientState"] = "guessed"
    unknown = json.loads(json.dumps(genuine))
    unknown["value"][0]["subscriptionId"] = "SUB-other"
    odd_event = json.loads(json.dumps(genuine))
    odd_event["value"][0]["lifecycleEvent"] = {"not": "a string"}
    before = len(server.requests)
    for body in (forged, unknown, odd_event, {"value": "x"}, [1, 2], {"value": [None, 3]}):
        response = await client.post("/graph/lifecycle", json=body)
        assert response.status_code == 403, body
    for raw in (b"not json", b"", b"\xff\xfe"):
        response = await client.post("/graph/lifecycle", content=raw)
        assert response.status_code == 403
    huge = await client.post("/graph/lifecycle", content=b"{" + b" " * (1 << 21) + b"}")
    assert huge.status_code == 413
    assert graph_calls(server, before) == [] and woken == []
    assert await alerts(services, BOB) == []
    held_now = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}
    assert held_now[BOB] == held[BOB]  # nothing marked due

    # One genuine among forged ones: only the genuine one acts.
    mixed = {"value": [forged["value"][0], server.lifecycle_notification(
        sub_id, "missed")["value"][0], unknown["value"][0]]}
    response = await client.post("/graph/lifecycle", json=mixed)
    assert response.status_code == 202 and woken == [(BOB, Channel.INCOMING)]
    assert graph_calls(server, before) == []


async def test_lifecycle_events_sent_to_the_notification_url_are_handled(
        services: Services, server: GraphServer, client: httpx.AsyncClient) -> None:
    held = await subscribed(services, server, BOB)
    sub_id = held[BOB].subscription_id
    response = await client.post("/graph/notify", json=server.lifecycle_notification(
        sub_id, "reauthorizationRequired"))
    assert response.status_code == 202 and server.reauthorized == [sub_id]


async def test_a_failed_action_alerts_and_the_next_round_makes_up_for_it(
        services: Services, server: GraphServer, client: httpx.AsyncClient) -> None:
    held = await subscribed(services, server, BOB)
    sub_id = held[BOB].subscription_id
    server.throttle_for["reauthorize"] = [120]  # longer than we wait in place
    response = await client.post("/graph/lifecycle", json=server.lifecycle_notification(
        sub_id, "reauthorizationRequired"))
    assert response.status_code == 202 and server.reauthorized == []
    [alert] = await alerts(services, BOB)
    assert alert.severity is Severity.WARNING and alert.code == "throttled"
    assert "reauthorize" in alert.message and "delta polling" in alert.message
    # Persisted before the answer: the row is due, so the next round renews it (a renewal
    # also reauthorizes).
    due = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}[BOB]
    assert due.expires_at <= services.clock()
    before = len(server.requests)
    report = await GraphSubscriptions(services.db, services.clock).ensure(URL)
    assert report.renewed == [BOB]
    [patch] = graph_calls(server, before)
    assert patch.method == "PATCH" and patch.path == f"/v1.0/subscriptions/{sub_id}"

    # Permission revoked: reauthorizing is refused with what to grant.
    server.apps[APP].roles = {"User.Read.All"}
    response = await client.post("/graph/lifecycle", json=server.lifecycle_notification(
        sub_id, "reauthorizationRequired"))
    assert response.status_code == 202
    newest = (await alerts(services, BOB))[0]
    assert newest.code == "permission-missing" and "Mail." in newest.fix


async def test_gone_on_graph_when_reauthorizing_is_recreated(
        services: Services, server: GraphServer, client: httpx.AsyncClient,
        woken: list[tuple[str, Channel]]) -> None:
    held = await subscribed(services, server, BOB)
    old = held[BOB].subscription_id
    payload = server.lifecycle_notification(old, "reauthorizationRequired")
    del server.subscriptions[old]
    response = await client.post("/graph/lifecycle", json=payload)
    assert response.status_code == 202
    new = {s.mailbox: s for s in await GraphSubscriptions(services.db).held()}[BOB]
    assert new.subscription_id != old and new.subscription_id in server.subscriptions
    assert woken == [(BOB, Channel.INCOMING)]
