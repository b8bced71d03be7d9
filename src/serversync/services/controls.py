"""Administrator controls the web needs beyond `services.admin`, and the overview figures.

* Switching one channel of a mailbox on or off. Turning a channel off is always allowed;
  turning it on is allowed only where Test & Enable would allow it (`core.rules.enable_problems`)
  and only after a successful test, because enabling an untested channel would only
  produce a failure alert on the first run (the reference re-enables through Test & Enable
  too, `dynamics-sss.md` §4.1).
* Deleting a directory record, resolving an alert.
* The counts the dashboard and ``/metrics`` show: mailboxes by channel status, approval,
  open alerts by severity (grouped in SQL, so 10,000 mailboxes cost one query per channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serversync.core import rules
from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import Channel, ChannelStatus, Mailbox, PartyKind, SyncMethod
from serversync.services.admin import Clock, utcnow
from serversync.store.db import Database
from serversync.store.web import WebStore


@dataclass(frozen=True, slots=True)
class ChannelCount:
    channel: Channel
    state: str  # success | failure | not-run | disabled | none
    mailboxes: int


@dataclass(frozen=True, slots=True)
class Overview:
    channels: tuple[ChannelCount, ...] = ()
    approval: dict[str, int] = field(default_factory=dict)
    open_alerts: dict[str, int] = field(default_factory=dict)

    def count(self, channel: Channel, state: str) -> int:
        return sum(c.mailboxes for c in self.channels if c.channel is channel and c.state == state)

    @property
    def mailboxes(self) -> int:
        return sum(c.mailboxes for c in self.channels if c.channel is Channel.INCOMING)


def channel_state(method: str, enabled: bool, status: str) -> str:
    """One word for a channel: none (not synced), disabled, or its last status."""
    if method != SyncMethod.SERVER_SIDE.value:
        return "none"
    if not enabled and status != ChannelStatus.FAILURE.value:
        return "disabled"
    return status


class Controls:
    def __init__(self, db: Database, clock: Clock = utcnow) -> None:
        self.db = db
        self.clock = clock

    async def set_channel_enabled(self, address: str, channel: Channel, enabled: bool) -> Mailbox:
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            state = mailbox.channel(channel)
            if enabled:
                if state.method is not SyncMethod.SERVER_SIDE:
                    raise RuleViolation(
                        f"{channel.value} of {mailbox.address} is not synchronized (method: "
                        f"{state.method.value})", code="not-server-side",
                        fix=f"set {channel.value} to server-side first, then Test & Enable")
                problem = rules.enable_problems(await repo.get_settings(),
                                                await repo.get_profile(mailbox.profile),
                                                mailbox, channel)
                if problem is not None:
                    raise problem
                if state.status is not ChannelStatus.SUCCESS:
                    raise RuleViolation(
                        f"{channel.value} of {mailbox.address} has not passed a test "
                        f"(status: {state.status.value})", code="not-tested",
                        fix="run Test & Enable: it enables the channel when the test passes")
            await repo.set_channel(mailbox.address, channel, enabled=enabled)
            return await repo.get_mailbox(mailbox.address)

    async def delete_party(self, kind: PartyKind, key: str) -> None:
        async with self.db.transaction() as repo:
            if await repo.get_party(kind, key) is None:
                raise NotFound(f"no {kind.value} {key!r} in the directory")
            owned = [m.address for m in await repo.list_mailboxes()
                     if m.owner_kind is kind and m.owner == key]
            if owned:
                raise RuleViolation(f"{kind.value} {key!r} owns mailboxes: {', '.join(owned)}",
                                    fix="delete or reassign those mailboxes first",
                                    code="party-in-use")
            await repo.delete_party(kind, key)

    async def resolve_alert(self, alert_id: int) -> None:
        async with self.db.transaction() as repo:
            if not await WebStore(repo.session, repo.keyring).resolve_alert(alert_id,
                                                                            self.clock()):
                raise NotFound(f"no open alert {alert_id}")

    async def overview(self) -> Overview:
        async with self.db.transaction() as repo:
            store = WebStore(repo.session, repo.keyring)
            rows = await store.channel_counts()
            approval = await store.approval_counts()
            alerts = await store.open_alert_counts()
        totals: dict[tuple[Channel, str], int] = {}
        for channel, method, enabled, status, count in rows:
            key = (Channel(channel), channel_state(method, enabled, status))
            totals[key] = totals.get(key, 0) + count
        return Overview(tuple(ChannelCount(c, s, n) for (c, s), n in sorted(totals.items())),
                        approval, alerts)
