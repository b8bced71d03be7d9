"""Microsoft Graph change notifications for Exchange Online mailboxes: push, with delta polling
as the safety net.

Follows Microsoft Graph v1.0 "Set up notifications for changes in resource data" and the
``subscription`` resource: a subscription per mailbox on
``users/{address}/mailFolders('inbox')/messages`` (changeType ``created``), created for at
most 4230 minutes (`connectors.graph.MAIL_SUBSCRIPTION_MAX`, the Outlook limit) and renewed
(PATCH ``expirationDateTime``) once less than ``margin`` is left. A notification only says
"something arrived": it makes the incoming channel due at once (`RunLog.request_sync`); the
delta query then reads what changed. Lost notifications, an expired subscription or no
notification URL at all only mean the change is seen at the next regular poll.

`GraphSubscriptions.ensure` is called periodically by the runtime (`runtime.local`,
`runtime.worker`) when ``SERVERSYNC_GRAPH_NOTIFICATION_URL`` is set. It

* creates a subscription for each Exchange Online mailbox whose incoming channel is synced
  and enabled and has none (or one for another notification URL),
* renews those expiring within ``margin`` (one Graph no longer knows is created again),
* deletes those of mailboxes that are gone, disabled or no longer on an Exchange Online
  profile.

`GraphSubscriptions.receive` checks a notification POST: each notification must name a
subscription we hold and carry its clientState. The clientState is 32 random bytes made
at creation, sent once to Graph and never stored or logged: the table keeps its SHA-256,
compared in constant time.

Lifecycle notifications (Microsoft Graph "Reduce missing subscriptions and change
notifications"): every subscription is created with a ``lifecycleNotificationUrl``
(`lifecycle_url_for`: ``…/graph/lifecycle`` beside ``…/graph/notify``; Graph cannot add one
later, so a subscription made without it, or with another, is deleted and created again).
Graph posts ``{"value": [{subscriptionId, clientState, lifecycleEvent, …}]}`` there, checked
exactly like change notifications, and ``receive`` sorts them:

* ``missed`` — some change notifications were not delivered: the incoming channel is made due
  at once (its delta query reads whatever was missed);
* ``reauthorizationRequired`` — `act` reauthorizes right away (``POST …/reauthorize``; a
  subscription within the renewal margin is renewed by PATCH instead, which also
  reauthorizes);
* ``subscriptionRemoved`` — `act` creates the subscription again, then makes the incoming
  channel due (changes made while it was gone were not notified).

The last two are persisted before the POST is answered: the row is marked due
(`store.exchange.GraphSubscriptions.make_due`), so if the immediate action is lost (a crash,
Graph unreachable) the next ``ensure`` round renews — which reauthorizes — or, on a 404,
recreates it. Removals, failures and missed notifications leave an alert on the mailbox for
the administrator; successful reauthorizations only a log line (Graph may ask every few
minutes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from serversync.connectors import graph
from serversync.connectors.oauth import TokenCache
from serversync.core import rules
from serversync.core.errors import NotFound, SyncError
from serversync.core.model import (
    Alert,
    Channel,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
    Severity,
    SyncMethod,
)
from serversync.services.admin import Clock, connect_options, utcnow
from serversync.store.db import Database
from serversync.store.exchange import GraphSubscriptions as SubscriptionStore
from serversync.store.exchange import StoredSubscription

log = logging.getLogger("serversync.graph.subscriptions")

EVERY_S = 900.0  # how often the runtime calls `ensure` (well inside the renewal margin)
MAX_BODY = 1 << 20  # a notification POST larger than this is not read


NOTIFY_PATH = "/graph/notify"
LIFECYCLE_PATH = "/graph/lifecycle"
# lifecycleEvent values (Graph v1.0 changeNotification)
REAUTHORIZATION_REQUIRED = "reauthorizationRequired"
SUBSCRIPTION_REMOVED = "subscriptionRemoved"
MISSED = "missed"
ALERT_AGAIN_AFTER = dt.timedelta(hours=1)  # one open info alert per mailbox and code is enough

# "Sync now" for a mailbox's incoming channel; False when it is off or gone.
SyncNow = Callable[[str], Awaitable[bool]]


def state_hash(client_state: str) -> str:
    return hashlib.sha256(client_state.encode()).hexdigest()


def lifecycle_url_for(notification_url: str) -> str:
    """The lifecycleNotificationUrl that goes with ``notification_url``.

    ``…/graph/notify`` → ``…/graph/lifecycle`` (the receiver's own route). Any other address
    (a proxy path we cannot map) gets the notification URL itself, which Graph allows and our
    receiver handles: both routes accept both kinds of notification.
    """
    parsed = urllib.parse.urlsplit(notification_url)
    if parsed.path.endswith(NOTIFY_PATH):
        path = parsed.path[: -len(NOTIFY_PATH)] + LIFECYCLE_PATH
        return urllib.parse.urlunsplit(parsed._replace(path=path))
    return notification_url


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A genuine lifecycle notification: the subscription as held before it arrived."""

    event: str
    subscription: StoredSubscription


@dataclass
class Received:
    """What a notification POST held, once checked (see `GraphSubscriptions.receive`)."""

    changed: list[str] = field(default_factory=list)  # mailboxes with change notifications
    events: list[LifecycleEvent] = field(default_factory=list)
    refused: int = 0  # unknown subscription, wrong clientState or malformed

    @property
    def genuine(self) -> bool:
        return bool(self.changed or self.events)

    @property
    def sync_now(self) -> list[str]:
        """Mailboxes whose incoming channel should run at once."""
        wanted = [*self.changed, *(e.subscription.mailbox for e in self.events
                                   if e.event in (MISSED, SUBSCRIPTION_REMOVED))]
        return list(dict.fromkeys(wanted))

    @property
    def actions(self) -> list[LifecycleEvent]:
        """Lifecycle events that need a Graph request (`GraphSubscriptions.act`)."""
        return [e for e in self.events
                if e.event in (REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED)]


@dataclass
class LifecycleReport:
    reauthorized: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # replaced, unwanted or gone meanwhile
    failed: dict[str, str] = field(default_factory=dict)  # address -> error message


@dataclass
class EnsureReport:
    created: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # address -> error message


@dataclass(frozen=True, slots=True)
class _Wanted:
    profile: Profile
    mailbox: Mailbox


class GraphSubscriptions:
    """Keeps one Graph subscription per Exchange Online mailbox and checks notifications."""

    def __init__(self, db: Database, clock: Clock = utcnow, *,
                 margin: dt.timedelta = graph.RENEW_MARGIN,
                 lifetime: dt.timedelta = graph.MAIL_SUBSCRIPTION_MAX,
                 concurrency: int = 8, tokens: TokenCache | None = None) -> None:
        self.db, self.clock = db, clock
        self.margin, self.lifetime = margin, lifetime
        self.concurrency = concurrency
        self.tokens = tokens or TokenCache()

    # ------------------------------------------------------------ ensure

    async def _state(self) -> tuple[dict[str, Profile], dict[str, _Wanted],
                                    dict[str, StoredSubscription]]:
        """Profiles, the mailboxes that should have a subscription, and those we hold."""
        async with self.db.transaction() as repo:
            profiles = {p.name: p for p in await repo.list_profiles()}
            mailboxes = await repo.list_mailboxes()
            held = {s.mailbox: s for s in await SubscriptionStore(repo.session).all()}
        wanted: dict[str, _Wanted] = {}
        for box in mailboxes:
            profile = profiles.get(box.profile)
            if (profile is not None and profile.kind is ServerKind.EXCHANGE_ONLINE
                    and box.incoming.method is SyncMethod.SERVER_SIDE and box.incoming.enabled):
                wanted[box.address] = _Wanted(profile, box)
        return profiles, wanted, held

    async def ensure(self, notification_url: str,
                     lifecycle_url: str | None = None) -> EnsureReport:
        """Create missing, renew expiring, delete unwanted subscriptions (see module doc).

        ``lifecycle_url`` defaults to `lifecycle_url_for` the notification URL.
        """
        lifecycle = lifecycle_url or lifecycle_url_for(notification_url)
        profiles, wanted, held = await self._state()
        report = EnsureReport()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(address: str) -> None:
            async with gate:
                try:
                    await self._one(address, wanted.get(address), held.get(address),
                                    profiles, notification_url, lifecycle, report)
                except SyncError as exc:  # one mailbox's failure never stops the others
                    report.failed[address] = exc.message
                    log.warning("Graph subscription for %s: %s", address, exc.message)

        await asyncio.gather(*(one(a) for a in sorted(set(wanted) | set(held))))
        return report

    async def _one(self, address: str, want: _Wanted | None, have: StoredSubscription | None,
                   profiles: dict[str, Profile], notification_url: str, lifecycle_url: str,
                   report: EnsureReport) -> None:
        now = self.clock()
        if have is not None and (want is None or want.profile.name != have.profile
                                 or have.notification_url != notification_url
                                 or have.lifecycle_url != lifecycle_url):
            await self._delete(have, profiles, want)
            report.deleted.append(address)
            have = None
        if want is None:
            return
        async with self._client(want.profile, want.mailbox) as client:
            if have is not None and have.resource == client.inbox_resource():
                if have.expires_at - now > self.margin:
                    return
                try:
                    await self._renew(client, have, now)
                except NotFound:
                    pass  # Graph dropped it (expired or removed): create a new one below
                else:
                    report.renewed.append(address)
                    return
            await self._create(client, want, notification_url, lifecycle_url, now)
            report.created.append(address)

    async def _renew(self, client: graph.GraphClient, have: StoredSubscription,
                     now: dt.datetime) -> None:
        current = graph.Subscription(have.subscription_id, have.resource, have.expires_at)
        renewed = await client.renew(current, now=now, lifetime=self.lifetime)
        await self._save(dataclasses.replace(have, expires_at=renewed.expires_at))

    async def _create(self, client: graph.GraphClient, want: _Wanted, notification_url: str,
                      lifecycle_url: str | None, now: dt.datetime) -> None:
        resource = client.inbox_resource()
        client_state = secrets.token_urlsafe(32)
        created = await client.subscribe(resource, notification_url,
                                         client_state=client_state, change_type="created",
                                         lifecycle_url=lifecycle_url, now=now,
                                         lifetime=self.lifetime)
        await self._save(StoredSubscription(
            want.mailbox.address, want.profile.name, created.id, created.resource or resource,
            notification_url, created.expires_at, state_hash(client_state), lifecycle_url))

    async def _delete(self, have: StoredSubscription, profiles: dict[str, Profile],
                      want: _Wanted | None) -> None:
        profile = profiles.get(have.profile)
        if profile is not None and profile.kind is ServerKind.EXCHANGE_ONLINE:
            # The mailbox may be gone: an app login only needs the profile and the address.
            box = want.mailbox if want is not None and want.profile is profile else Mailbox(
                have.mailbox, PartyKind.USER, have.mailbox, profile.name)
            async with self._client(profile, box) as client:
                try:
                    await client.unsubscribe(have.subscription_id)
                except NotFound:
                    pass  # already gone on Graph
        # Without the profile there is no credential to delete it with; Graph drops it at
        # its expiry, and its notifications no longer match a row (refused).
        async with self.db.transaction() as repo:
            await SubscriptionStore(repo.session).forget(have.mailbox)

    def _client(self, profile: Profile, mailbox: Mailbox) -> graph.GraphClient:
        login = rules.login_for(profile, mailbox, Channel.INCOMING)
        return graph.GraphClient(profile, login, connect_options(profile), tokens=self.tokens)

    async def _save(self, subscription: StoredSubscription) -> None:
        async with self.db.transaction() as repo:
            await SubscriptionStore(repo.session).put(subscription, self.clock())

    # ------------------------------------------------------------ notifications

    async def receive(self, body: bytes) -> Received:
        """Check a webhook POST (change or lifecycle notifications, to either route).

        A notification counts only when its ``subscriptionId`` is one we hold and its
        ``clientState`` hashes to the one we sent; anything else (forged, stale, malformed) is
        refused and triggers nothing. In the same transaction, genuine lifecycle events are
        persisted: ``reauthorizationRequired`` and ``subscriptionRemoved`` mark the
        subscription due (see module doc), ``missed`` leaves an alert.
        """
        received = Received()
        try:
            data = json.loads(body)
        except ValueError:
            received.refused = 1
            return received
        values = data.get("value") if isinstance(data, dict) else None
        if not isinstance(values, list):
            received.refused = 1
            return received
        now = self.clock()
        async with self.db.transaction() as repo:
            store = SubscriptionStore(repo.session)
            for item in values:
                held = await self._genuine(store, item)
                if held is None:
                    received.refused += 1
                    continue
                event = item.get("lifecycleEvent")
                if event is None:
                    if held.mailbox not in received.changed:
                        received.changed.append(held.mailbox)
                    continue
                if not isinstance(event, str):
                    received.refused += 1
                    continue
                received.events.append(LifecycleEvent(event, held))
                if event in (REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED):
                    await store.make_due(held.subscription_id, now)
                elif event == MISSED:
                    await self._alert(repo, Alert(
                        Severity.INFO, "graph-notifications-missed",
                        f"Microsoft Graph reported that change notifications for "
                        f"{held.mailbox} were not delivered (lifecycle event 'missed'); an "
                        "incoming sync was started to read what was missed",
                        "nothing to do; if it recurs, check that the notification URL "
                        "answers within 3 seconds (Graph throttles slow endpoints)",
                        mailbox=held.mailbox, channel=Channel.INCOMING, created_at=now))
                else:
                    log.warning("Graph lifecycle event %r for %s is not one we know; ignored",
                                event[:40], held.mailbox)
        if received.refused:
            log.warning("Graph notification POST: %d notification(s) refused (unknown "
                        "subscription, clientState mismatch or malformed)", received.refused)
        return received

    @staticmethod
    async def _genuine(store: SubscriptionStore, item: Any) -> StoredSubscription | None:
        if not isinstance(item, dict):
            return None
        sub_id, state = item.get("subscriptionId"), item.get("clientState")
        if not isinstance(sub_id, str) or not isinstance(state, str) or len(sub_id) > 255:
            return None
        held = await store.by_id(sub_id)
        if held is None or not hmac.compare_digest(held.client_state_hash, state_hash(state)):
            return None
        return held

    # ------------------------------------------------------------ lifecycle actions

    async def act(self, events: Sequence[LifecycleEvent], sync_now: SyncNow) -> LifecycleReport:
        """Answer ``reauthorizationRequired`` and ``subscriptionRemoved`` events now.

        Runs after the POST was answered (Graph wants 202 within 3 seconds); never raises.
        What fails stays marked due for the next ``ensure`` round and leaves an alert.
        """
        report = LifecycleReport()
        try:
            _, wanted, held = await self._state()
        except Exception:
            log.exception("Graph lifecycle events: reading the subscriptions failed")
            return report
        done: set[tuple[str, str]] = set()
        for item in events:
            address, sub_id = item.subscription.mailbox, item.subscription.subscription_id
            if (address, sub_id) in done:
                continue  # the same event twice in one batch
            done.add((address, sub_id))
            have, want = held.get(address), wanted.get(address)
            if have is None or have.subscription_id != sub_id or want is None \
                    or want.profile.name != have.profile:
                # replaced meanwhile, or no longer wanted: ensure deletes or has dealt with it
                report.skipped.append(address)
                continue
            try:
                if item.event == REAUTHORIZATION_REQUIRED:
                    recreated = await self._reauthorize(want, item.subscription, report)
                else:
                    async with self._client(want.profile, want.mailbox) as client:
                        await self._create(client, want, have.notification_url,
                                           have.lifecycle_url, self.clock())
                    report.recreated.append(address)
                    recreated = True
                if recreated:
                    await self._recreated(have)
                    await sync_now(address)  # changes made meanwhile were not notified
            except Exception as exc:
                report.failed[address] = exc.message if isinstance(exc, SyncError) \
                    else repr(exc)
                if not isinstance(exc, SyncError):
                    log.exception("Graph lifecycle event %s for %s", item.event, address)
                await self._failed(item, want, exc)
        return report

    async def _reauthorize(self, want: _Wanted, original: StoredSubscription,
                           report: LifecycleReport) -> bool:
        """``POST /subscriptions/{id}/reauthorize``, or a renewal when one is due anyway;
        True when Graph no longer knew the subscription and it was created again."""
        now = self.clock()
        async with self._client(want.profile, want.mailbox) as client:
            try:
                if original.expires_at - now <= self.margin:
                    await self._renew(client, original, now)
                    report.renewed.append(original.mailbox)
                else:
                    await client.reauthorize(original.subscription_id)
                    await self._save(original)  # the expiry it had before it was marked due
                    report.reauthorized.append(original.mailbox)
            except NotFound:  # gone on Graph already: answer as for subscriptionRemoved
                await self._create(client, want, original.notification_url,
                                   original.lifecycle_url, now)
                report.recreated.append(original.mailbox)
                return True
        log.info("Graph subscription of %s reauthorized", original.mailbox)
        return False

    async def _recreated(self, have: StoredSubscription) -> None:
        log.info("Graph subscription of %s was removed by Graph and created again",
                 have.mailbox)
        async with self.db.transaction() as repo:
            await self._alert(repo, Alert(
                Severity.INFO, "graph-subscription-removed",
                f"Microsoft Graph removed the change-notification subscription of "
                f"{have.mailbox}; a new one was created and an incoming sync started to read "
                "what changed meanwhile",
                "nothing to do; if it recurs, check the app's permissions and the mailbox's "
                "RBAC for Applications scope", mailbox=have.mailbox, profile=have.profile,
                channel=Channel.INCOMING, created_at=self.clock()))

    async def _failed(self, item: LifecycleEvent, want: _Wanted, exc: Exception) -> None:
        """An alert saying what Graph asked, what failed, and what to do."""
        asked = ("to reauthorize" if item.event == REAUTHORIZATION_REQUIRED
                 else "for a new")
        if isinstance(exc, SyncError):
            code, reason, fix = exc.code, exc.message, exc.fix
        else:
            code, reason, fix = "error", "an unexpected error", ""
        try:
            async with self.db.transaction() as repo:
                await self._alert(repo, Alert(
                    Severity.WARNING, code,
                    f"Microsoft Graph asked {asked} change-notification subscription of "
                    f"{item.subscription.mailbox} ({item.event}) and that failed: {reason}; "
                    "push notifications may stop, delta polling goes on, and the next "
                    "subscription round retries",
                    fix or "check the profile's app credentials and permissions",
                    mailbox=item.subscription.mailbox, profile=want.profile.name,
                    channel=Channel.INCOMING, created_at=self.clock()), dedupe=False)
        except Exception:
            log.exception("could not record the alert for %s", item.subscription.mailbox)

    @staticmethod
    async def _alert(repo: Any, alert: Alert, *, dedupe: bool = True) -> None:
        """Add ``alert`` unless the same one is still open from the last hour."""
        try:
            if dedupe:
                for open_alert in await repo.list_alerts(mailbox=alert.mailbox):
                    if open_alert.code == alert.code and \
                            alert.created_at - open_alert.created_at < ALERT_AGAIN_AFTER:
                        return
            await repo.add_alert(alert)
        except NotFound:  # the mailbox was deleted meanwhile: a log line will do
            log.warning("%s", alert.message)

    async def held(self) -> Sequence[StoredSubscription]:
        async with self.db.transaction() as repo:
            return await SubscriptionStore(repo.session).all()
