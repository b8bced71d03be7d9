"""Webhooks: signed POSTs on tracked email, sent and failed email, failed runs and alerts.

Two ways in, one way out:

* `emit(repo, event, payload)` writes a delivery row for every subscribed webhook inside the
  caller's transaction (the transactional outbox), so an event exists if and only if the
  change it reports was committed. Producers that own a transaction call it directly
  (the runtime for ``run.failed``).
* `Webhooks.collect()` scans the alerts and email tables for rows that appeared since the
  last scan (``alert.created``, ``email.tracked``, ``email.sent``, ``email.failed``), so
  every producer is covered without having to know about webhooks. It re-reads a 15-minute
  margin each time, because on PostgreSQL a row with a lower id can commit after a higher
  one; the unique ``(webhook, dedupe_key)`` makes reading a row twice harmless.

`Webhooks.deliver_pending()` (called periodically by the runtime, and directly by tests)
sends what is due: each delivery is claimed with a short lease (`store.web.WebStore.claim`),
POSTed with an HMAC-SHA256 signature over timestamp and body (`core.webhooks`), and either
marked delivered (2xx) or rescheduled with exponential backoff and full jitter; after
`core.webhooks.MAX_ATTEMPTS` it is marked failed and an alert says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import random
import secrets
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.exc import IntegrityError

from serversync.core.errors import ConfigError
from serversync.core.model import Alert, Severity
from serversync.core.secret import Secret
from serversync.core.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    Delivery,
    DeliveryStatus,
    Event,
    Webhook,
    retry_delay,
    signature,
)
from serversync.services.admin import Clock, utcnow
from serversync.store.db import Database
from serversync.store.repos import Repository
from serversync.store.web import WebStore

LEASE = dt.timedelta(seconds=60)
SCAN_MARGIN = dt.timedelta(minutes=15)
SCAN_PAGE = 500
USER_AGENT = "serversync-webhooks/1"
# An alert about a failing webhook must not become a delivery to that same webhook, or a
# broken endpoint would feed itself an alert every few hours forever.
OWN_ALERT_CODES = ("webhook-failed",)


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    event: Event
    direction: str = ""
    statuses: tuple[str, ...] = ()


SOURCES = (
    Source("alerts", Event.ALERT_CREATED),
    Source("emails.tracked", Event.EMAIL_TRACKED, "incoming", ("received",)),
    Source("emails.sent", Event.EMAIL_SENT, "outgoing", ("sent",)),
    Source("emails.failed", Event.EMAIL_FAILED, "outgoing", ("failed",)),
)


@dataclass(frozen=True, slots=True)
class NewWebhook:
    """A created webhook; ``generated_secret`` is set (once) when the server chose the secret."""

    webhook: Webhook
    generated_secret: str | None = None


@dataclass
class DeliveryReport:
    queued: int = 0  # deliveries the scan added
    delivered: int = 0
    retrying: int = 0
    failed: int = 0  # gave up on these


def check_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ConfigError("url", "must be an http:// or https:// URL with a host")
    if parsed.username or parsed.password:
        # The URL is shown in the API and UI; credentials in it would leak there.
        raise ConfigError("url", "must not contain a user name or password",
                          fix="authenticate the receiver with the webhook's signing secret")
    return url.strip()


async def emit(repo: Repository, event: Event, payload: Mapping[str, Any], *,
               key: str | None = None, now: dt.datetime | None = None) -> int:
    """Queue ``event`` for every webhook that wants it, in the caller's transaction.

    ``key`` makes the event idempotent per webhook (an event with a key already queued is
    skipped). Returns the number of deliveries queued.
    """
    store = WebStore(repo.session, repo.keyring)
    hooks = [h for h in await store.list_webhooks() if h.id is not None and h.wants(event)]
    if not hooks:
        return 0
    existing = await store.existing_keys([key]) if key else set()
    when = now or utcnow()
    queued = 0
    for hook in hooks:
        assert hook.id is not None
        if key is not None and (hook.id, key) in existing:
            continue
        await store.enqueue(hook.id, event, dict(payload), when, key)
        queued += 1
    await repo.session.flush()
    return queued


def body_of(delivery: Delivery) -> bytes:
    return json.dumps({"id": delivery.id, "event": delivery.event.value,
                       "created_at": delivery.created_at.isoformat(),
                       "data": delivery.payload}, separators=(",", ":"), default=str).encode()


class Webhooks:
    """Webhook configuration and the delivery loop."""

    def __init__(self, db: Database, clock: Clock = utcnow, *,
                 transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = 10.0,
                 concurrency: int = 8, rand: Callable[[], float] = random.random) -> None:
        self.db = db
        self.clock = clock
        self.transport = transport
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.rand = rand

    # ------------------------------------------------------------ configuration

    async def create(self, url: str, events: Sequence[Event], *, secret: Secret | None = None,
                     description: str = "", active: bool = True) -> NewWebhook:
        if not events:
            raise ConfigError("events", "choose at least one event",
                              fix=f"one or more of: {', '.join(e.value for e in Event)}")
        generated = None
        if secret is None:
            generated = secrets.token_urlsafe(32)
            secret = Secret(generated)
        hook = Webhook(check_url(url), tuple(dict.fromkeys(events)), secret, active,
                       description, self.clock())
        async with self.db.transaction() as repo:
            saved = await WebStore(repo.session, repo.keyring).add_webhook(hook)
        return NewWebhook(saved, generated)

    async def all(self) -> list[Webhook]:
        async with self.db.transaction() as repo:
            return await WebStore(repo.session, repo.keyring).list_webhooks()

    async def get(self, webhook_id: int) -> Webhook:
        async with self.db.transaction() as repo:
            return await WebStore(repo.session, repo.keyring).get_webhook(webhook_id)

    async def set_active(self, webhook_id: int, active: bool) -> Webhook:
        async with self.db.transaction() as repo:
            return await WebStore(repo.session, repo.keyring).set_webhook_active(webhook_id,
                                                                                 active)

    async def delete(self, webhook_id: int) -> None:
        async with self.db.transaction() as repo:
            await WebStore(repo.session, repo.keyring).delete_webhook(webhook_id)

    async def deliveries(self, webhook_id: int | None = None, limit: int = 100) -> list[Delivery]:
        async with self.db.transaction() as repo:
            return await WebStore(repo.session, repo.keyring).list_deliveries(webhook_id, limit)

    async def emit(self, event: Event, payload: Mapping[str, Any], *,
                   key: str | None = None) -> int:
        """`emit` in a transaction of its own, for callers that have none."""
        async with self.db.transaction() as repo:
            return await emit(repo, event, payload, key=key, now=self.clock())

    async def ping(self, webhook_id: int) -> None:
        """Queue a ``ping`` for one webhook (the UI's and API's "test webhook")."""
        now = self.clock()
        async with self.db.transaction() as repo:
            store = WebStore(repo.session, repo.keyring)
            await store.get_webhook(webhook_id)
            await store.enqueue(webhook_id, Event.PING, {"sent_at": now.isoformat()}, now)

    # ------------------------------------------------------------ the source scanner

    async def collect(self) -> int:
        """Queue events for rows that appeared in the alerts and email tables since last time."""
        now = self.clock()
        queued = 0
        for source in SOURCES:
            try:
                async with self.db.transaction() as repo:
                    queued += await self._collect(repo, source, now)
            except IntegrityError:
                # Another worker queued the same rows at the same moment: its rows stand,
                # and the next scan (which re-reads the margin) finds nothing left to add.
                continue
        return queued

    async def _collect(self, repo: Repository, source: Source, now: dt.datetime) -> int:
        store = WebStore(repo.session, repo.keyring)
        state = await store.source(source.name)
        if state is None:
            # First scan: what is already there is history, not news.
            await store.set_source(source.name, await store.max_id(source.name), now)
            return 0
        since = state.scanned_at.replace(tzinfo=state.scanned_at.tzinfo or dt.UTC) - SCAN_MARGIN
        hooks = [h for h in await store.list_webhooks()
                 if h.id is not None and h.active and source.event in h.events]
        queued = 0
        after = state.floor_id
        while hooks:
            if source.name == "alerts":
                rows = await store.new_alerts(after, since, SCAN_PAGE)
            else:
                rows = await store.new_emails(after, since, direction=source.direction,
                                              statuses=source.statuses, limit=SCAN_PAGE)
            if not rows:
                break
            after = max(int(r["id"]) for r in rows)
            keys = {f"{source.name}:{r['id']}": r for r in rows
                    if not str(r.get("code", "")).startswith(OWN_ALERT_CODES)}
            existing = await store.existing_keys(keys)
            for hook in hooks:
                assert hook.id is not None
                for key, row in keys.items():
                    if (hook.id, key) not in existing:
                        await store.enqueue(hook.id, source.event, row, now, key)
                        queued += 1
            await repo.session.flush()
            if len(rows) < SCAN_PAGE:
                break
        await store.set_source(source.name, state.floor_id, now)
        return queued

    # ------------------------------------------------------------ delivery

    async def deliver_pending(self, limit: int = 200) -> DeliveryReport:
        """Scan the sources, then send every due delivery once; safe to run on many workers."""
        report = DeliveryReport(queued=await self.collect())
        now = self.clock()
        async with self.db.transaction() as repo:
            store = WebStore(repo.session, repo.keyring)
            due = await store.due(now, limit)
            hooks = {h.id: h for h in await store.list_webhooks()}
            claimed = [d for d in due if d.id is not None and d.next_attempt_at is not None
                       and await store.claim(d.id, d.next_attempt_at, now + LEASE)]
        if not claimed:
            return report
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(transport=self.transport, timeout=self.timeout_s,
                                     follow_redirects=False,
                                     headers={"User-Agent": USER_AGENT}) as client:
            async def one(delivery: Delivery) -> DeliveryStatus | None:
                async with gate:
                    return await self._deliver(client, hooks.get(delivery.webhook_id), delivery)
            outcomes = await asyncio.gather(*(one(d) for d in claimed))
        for outcome in outcomes:
            if outcome is DeliveryStatus.DELIVERED:
                report.delivered += 1
            elif outcome is DeliveryStatus.FAILED:
                report.failed += 1
            else:
                report.retrying += 1
        return report

    async def _deliver(self, client: httpx.AsyncClient, hook: Webhook | None,
                       delivery: Delivery) -> DeliveryStatus | None:
        assert delivery.id is not None
        attempts = delivery.attempts + 1
        status_code: int | None = None
        if hook is None or not hook.active:
            error = "the webhook is inactive or was deleted"
        else:
            body = body_of(delivery)
            headers = {"Content-Type": "application/json", EVENT_HEADER: delivery.event.value,
                       DELIVERY_HEADER: str(delivery.id)}
            if hook.secret is not None:
                stamp = int(self.clock().timestamp())
                headers[SIGNATURE_HEADER] = signature(hook.secret, stamp, body)
            try:
                response = await client.post(hook.url, content=body, headers=headers)
                status_code = response.status_code
                error = "" if response.is_success else f"HTTP {status_code}"
            except httpx.HTTPError as exc:
                # The exception text names the failure (refused, timeout), never the body.
                error = f"{type(exc).__name__}: {exc}"[:500]
        now = self.clock()
        if not error:
            status: DeliveryStatus | None = DeliveryStatus.DELIVERED
            next_at, delivered_at = now, now
        elif attempts >= MAX_ATTEMPTS:
            status, next_at, delivered_at = DeliveryStatus.FAILED, now, None
        else:
            status, delivered_at = None, None
            next_at = now + dt.timedelta(seconds=retry_delay(attempts, self.rand))
        async with self.db.transaction() as repo:
            await WebStore(repo.session, repo.keyring).record(
                delivery.id, status=status or DeliveryStatus.PENDING, attempts=attempts,
                next_attempt_at=next_at, error=error, response_status=status_code,
                delivered_at=delivered_at)
            if status is DeliveryStatus.FAILED:
                target = hook.url if hook else f"webhook {delivery.webhook_id}"
                await repo.add_alert(Alert(
                    Severity.WARNING, "webhook-failed",
                    f"webhook delivery {delivery.id} ({delivery.event.value}) to {target} "
                    f"failed {attempts} times; last error: {error}",
                    "check that the receiver is up and answers 2xx; new events are still "
                    "queued for it", created_at=now))
        return status


def redacted(hook: Webhook) -> Webhook:
    """The webhook without its secret (for anything that leaves the process)."""
    return dataclasses.replace(hook, secret=None)
