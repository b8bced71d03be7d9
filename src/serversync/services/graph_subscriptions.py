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

`GraphSubscriptions.accept` checks a notification POST: each notification must name a
subscription we hold and carry its clientState. The clientState is 32 random bytes made
at creation, sent once to Graph and never stored or logged: the table keeps its SHA-256,
compared in constant time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from serversync.connectors import graph
from serversync.connectors.oauth import TokenCache
from serversync.core import rules
from serversync.core.errors import NotFound, SyncError
from serversync.core.model import Channel, Mailbox, PartyKind, Profile, ServerKind, SyncMethod
from serversync.services.admin import Clock, connect_options, utcnow
from serversync.store.db import Database
from serversync.store.exchange import GraphSubscriptions as SubscriptionStore
from serversync.store.exchange import StoredSubscription

log = logging.getLogger("serversync.graph.subscriptions")

EVERY_S = 900.0  # how often the runtime calls `ensure` (well inside the renewal margin)
MAX_BODY = 1 << 20  # a notification POST larger than this is not read


def state_hash(client_state: str) -> str:
    return hashlib.sha256(client_state.encode()).hexdigest()


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

    async def ensure(self, notification_url: str) -> EnsureReport:
        """Create missing, renew expiring, delete unwanted subscriptions (see module doc)."""
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
        report = EnsureReport()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(address: str) -> None:
            async with gate:
                try:
                    await self._one(address, wanted.get(address), held.get(address),
                                    profiles, notification_url, report)
                except SyncError as exc:  # one mailbox's failure never stops the others
                    report.failed[address] = exc.message
                    log.warning("Graph subscription for %s: %s", address, exc.message)

        await asyncio.gather(*(one(a) for a in sorted(set(wanted) | set(held))))
        return report

    async def _one(self, address: str, want: _Wanted | None, have: StoredSubscription | None,
                   profiles: dict[str, Profile], notification_url: str,
                   report: EnsureReport) -> None:
        now = self.clock()
        if have is not None and (want is None or want.profile.name != have.profile
                                 or have.notification_url != notification_url):
            await self._delete(have, profiles, want)
            report.deleted.append(address)
            have = None
        if want is None:
            return
        async with self._client(want.profile, want.mailbox) as client:
            resource = client.inbox_resource()
            if have is not None and have.resource == resource:
                if have.expires_at - now > self.margin:
                    return
                current = graph.Subscription(have.subscription_id, have.resource,
                                             have.expires_at)
                try:
                    renewed = await client.renew(current, now=now, lifetime=self.lifetime)
                except NotFound:
                    pass  # Graph dropped it (expired or removed): create a new one below
                else:
                    await self._save(StoredSubscription(
                        address, want.profile.name, have.subscription_id, have.resource,
                        notification_url, renewed.expires_at, have.client_state_hash))
                    report.renewed.append(address)
                    return
            client_state = secrets.token_urlsafe(32)
            created = await client.subscribe(resource, notification_url,
                                             client_state=client_state, change_type="created",
                                             now=now, lifetime=self.lifetime)
            await self._save(StoredSubscription(
                address, want.profile.name, created.id, created.resource or resource,
                notification_url, created.expires_at, state_hash(client_state)))
            report.created.append(address)

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

    async def accept(self, body: bytes) -> list[str]:
        """The mailboxes named by the genuine notifications of a webhook POST.

        A notification counts only when its ``subscriptionId`` is one we hold and its
        ``clientState`` hashes to the one we sent; anything else (forged, stale, malformed)
        is ignored.
        """
        try:
            data = json.loads(body)
        except ValueError:
            return []
        values = data.get("value") if isinstance(data, dict) else None
        if not isinstance(values, list):
            return []
        found: list[str] = []
        async with self.db.transaction() as repo:
            store = SubscriptionStore(repo.session)
            for item in values:
                if not isinstance(item, dict):
                    continue
                sub_id, state = item.get("subscriptionId"), item.get("clientState")
                if not isinstance(sub_id, str) or not isinstance(state, str):
                    continue
                held = await store.by_id(sub_id)
                if held is None or not hmac.compare_digest(held.client_state_hash,
                                                           state_hash(state)):
                    continue
                if held.mailbox not in found:
                    found.append(held.mailbox)
        return found

    async def held(self) -> Sequence[StoredSubscription]:
        async with self.db.transaction() as repo:
            return await SubscriptionStore(repo.session).all()
