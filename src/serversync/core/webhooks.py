"""Webhooks: events, signatures and the retry schedule.

A webhook is an HTTPS (or loopback HTTP) endpoint that receives a signed ``POST`` for each
event it subscribed to. The signature follows the scheme Stripe and GitHub popularised:

    X-Serversync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is inside the MAC, so a captured request cannot be replayed later than the
receiver's tolerance (5 minutes in `verify`). Each delivery also carries
``X-Serversync-Event`` and ``X-Serversync-Delivery`` (a stable id: deliveries are at least
once, and a receiver deduplicates on it). Failed deliveries are retried with exponential
backoff and full jitter (AWS architecture blog, "Exponential Backoff And Jitter") up to
`MAX_ATTEMPTS`, then marked failed. Pure standard library.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serversync.core.secret import Secret

SIGNATURE_HEADER = "X-Serversync-Signature"
EVENT_HEADER = "X-Serversync-Event"
DELIVERY_HEADER = "X-Serversync-Delivery"
TOLERANCE_S = 300
MAX_ATTEMPTS = 10
BASE_DELAY_S = 30.0
MAX_DELAY_S = 3600.0


class Event(enum.StrEnum):
    EMAIL_TRACKED = "email.tracked"  # an incoming message became an email activity
    EMAIL_SENT = "email.sent"  # an outgoing email activity was sent
    EMAIL_FAILED = "email.failed"  # an outgoing email activity could not be sent
    RUN_FAILED = "run.failed"  # a whole sync run of a mailbox channel failed
    ALERT_CREATED = "alert.created"  # an administrator should read something
    PING = "ping"  # sent by "test webhook"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # gave up after MAX_ATTEMPTS


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    events: tuple[Event, ...]
    secret: Secret | None = None
    active: bool = True
    description: str = ""
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    id: int | None = None

    def wants(self, event: Event) -> bool:
        return self.active and (event in self.events or event is Event.PING)


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook_id: int
    event: Event
    payload: dict[str, Any]
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    next_attempt_at: dt.datetime | None = None
    last_error: str = ""
    response_status: int | None = None
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    delivered_at: dt.datetime | None = None
    id: int | None = None


def signature(secret: Secret, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.reveal().encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: Secret, header: str, body: bytes, now: float,
           tolerance: float = TOLERANCE_S) -> bool:
    """What a receiver does: check the MAC in constant time and the timestamp's age."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def retry_delay(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next try after ``attempts`` failed ones (full jitter, at least 1 s)."""
    ceiling: float = min(MAX_DELAY_S, BASE_DELAY_S * 2.0 ** max(attempts - 1, 0))
    return max(1.0, ceiling * rand())
