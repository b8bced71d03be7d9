"""Webhooks end to end: a loopback HTTP receiver checks signatures; retries with backoff;
deliveries survive a restart; the scanner turns new alerts into events exactly once."""

from __future__ import annotations

import datetime as dt
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from serversync.core.model import Alert, Severity
from serversync.core.secret import Secret
from serversync.core.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    DeliveryStatus,
    Event,
    verify,
)
from serversync.services.webhooks import Webhooks, emit
from serversync.store.db import Database

SECRET = "receiver-shared-secret-0123456789"


@dataclass
class Receiver:
    url: str
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    failures_left: int = 0  # answer 500 this many times first


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(({k: v for k, v in self.headers.items()}, body))
            failing = state.failures_left > 0
            state.failures_left -= int(failing)
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now


async def test_signed_delivery_retry_with_backoff_and_restart(db: Database,
                                                              receiver: Receiver) -> None:
    clock = Clock()
    hooks = Webhooks(db, clock, rand=lambda: 1.0)
    created = await hooks.create(receiver.url, [Event.EMAIL_SENT], secret=Secret(SECRET))
    assert created.generated_secret is None and created.webhook.id is not None
    async with db.transaction() as repo:  # the producer's own transaction (the outbox)
        assert await emit(repo, Event.EMAIL_SENT, {"email": 42}, key="sent:42", now=clock()) == 1
        assert await emit(repo, Event.EMAIL_SENT, {"email": 42}, key="sent:42", now=clock()) == 0
        assert await emit(repo, Event.ALERT_CREATED, {"x": 1}, now=clock()) == 0  # not subscribed
    receiver.failures_left = 2

    report = await hooks.deliver_pending()
    assert (report.delivered, report.retrying) == (0, 1)
    [delivery] = await hooks.deliveries()
    assert delivery.attempts == 1 and delivery.last_error == "HTTP 500"
    assert delivery.next_attempt_at == clock() + dt.timedelta(seconds=30)  # base delay
    assert (await hooks.deliver_pending()).delivered == 0  # not due yet: nothing sent
    assert len(receiver.requests) == 1

    clock.now += dt.timedelta(seconds=31)
    assert (await hooks.deliver_pending()).retrying == 1
    [delivery] = await hooks.deliveries()
    assert delivery.attempts == 2
    assert delivery.next_attempt_at == clock() + dt.timedelta(seconds=60)  # doubled

    # a new process (restart): the outbox row is still there and is delivered
    clock.now += dt.timedelta(seconds=61)
    restarted = Webhooks(db, clock)
    assert (await restarted.deliver_pending()).delivered == 1
    [delivery] = await restarted.deliveries()
    assert delivery.status is DeliveryStatus.DELIVERED and delivery.response_status == 204
    assert len(receiver.requests) == 3
    for headers, body in receiver.requests:
        assert headers[EVENT_HEADER] == "email.sent"
        assert headers[DELIVERY_HEADER] == str(delivery.id)
        assert verify(Secret(SECRET), headers[SIGNATURE_HEADER], body, now=time.time())
        assert not verify(Secret("wrong-secret-wrong-secret"), headers[SIGNATURE_HEADER], body,
                          now=time.time())
        assert b'"data":{"email":42}' in body and SECRET.encode() not in body
    assert (await restarted.deliver_pending()).delivered == 0  # delivered once only


async def test_gives_up_after_max_attempts_with_an_alert(db: Database,
                                                         receiver: Receiver) -> None:
    clock = Clock()
    hooks = Webhooks(db, clock, rand=lambda: 0.0)
    await hooks.create(receiver.url, [Event.RUN_FAILED])
    await hooks.emit(Event.RUN_FAILED, {"mailbox": "heidi@example.test"})
    receiver.failures_left = MAX_ATTEMPTS + 5
    for _ in range(MAX_ATTEMPTS):
        await hooks.deliver_pending()
        clock.now += dt.timedelta(seconds=2)
    [delivery] = await hooks.deliveries()
    assert delivery.status is DeliveryStatus.FAILED and delivery.attempts == MAX_ATTEMPTS
    assert len(receiver.requests) == MAX_ATTEMPTS
    async with db.transaction() as repo:
        alerts = await repo.list_alerts()
    assert [a.code for a in alerts] == ["webhook-failed"]
    # that alert is not turned into a delivery to the failing webhook (no feedback loop)
    assert (await hooks.deliver_pending()).queued == 0


async def test_scanner_turns_new_alerts_into_events_once(db: Database,
                                                         receiver: Receiver) -> None:
    clock = Clock()
    hooks = Webhooks(db, clock)
    async with db.transaction() as repo:
        await repo.add_alert(Alert(Severity.WARNING, "old", "history", "", created_at=clock()))
    await hooks.create(receiver.url, [Event.ALERT_CREATED], secret=Secret(SECRET))
    assert (await hooks.deliver_pending()).queued == 0  # the first scan marks history
    async with db.transaction() as repo:
        await repo.add_alert(Alert(Severity.ERROR, "auth-failed", "refused", "fix the password",
                                   created_at=clock()))
    clock.now += dt.timedelta(seconds=5)
    report = await hooks.deliver_pending()
    assert (report.queued, report.delivered) == (1, 1)
    clock.now += dt.timedelta(seconds=5)
    assert (await hooks.deliver_pending()).queued == 0  # re-reading the margin adds nothing
    [(headers, body)] = receiver.requests
    assert headers[EVENT_HEADER] == "alert.created" and b'"code":"auth-failed"' in body
    assert verify(Secret(SECRET), headers[SIGNATURE_HEADER], body, now=time.time())


async def test_two_senders_never_deliver_the_same_row_twice(db: Database,
                                                            receiver: Receiver) -> None:
    import asyncio
    clock = Clock()
    first, second = Webhooks(db, clock), Webhooks(db, clock)
    await first.create(receiver.url, [Event.EMAIL_TRACKED])
    for i in range(6):
        await first.emit(Event.EMAIL_TRACKED, {"email": i})
    a, b = await asyncio.gather(first.deliver_pending(), second.deliver_pending())
    assert a.delivered + b.delivered == 6
    assert sorted(body for _, body in receiver.requests) == sorted(set(
        body for _, body in receiver.requests))
    assert len(receiver.requests) == 6
