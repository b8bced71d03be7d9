"""Appointments, contacts and tasks: the application's API and the two-way sync job.

`ActService` is what the application calls to create, change and delete its records (they
are tombstoned on delete, so that the sync can propagate the delete), and what the runtime
calls to sync one mailbox (`ActJob`, registered for `Channel.ACT` in `serversync.wiring`).

One sync run, per server collection (calendar, task list, address book; in parallel):

1. read the status, the quarantine and the application's *touched* records — those whose
   state differs from the status (`store.act.ActStore.touched`, one indexed join);
2. ask the server what changed since the stored cursor (RFC 6578 token or ctag/etag
   listing) and read only items whose etag differs from the status (our own writes do not);
   unreadable items and duplicated UIDs are quarantined with an alert, the rest go on;
3. when neither side changed, stop (the no-change sync is three cheap requests);
4. otherwise build both sides' versions — real ones for touched items, the status' hashes
   for the rest — and let the pure planner (`core.plan`) decide;
5. run the actions in chunks: the server write first, then one transaction with the
   application records, the status rows and the recorded conflicts of the chunk. A crash
   between the two leaves a server copy the next run recognises by its UID and content
   (the planner links equal copies), so a rerun converges with nothing duplicated;
6. store the new cursor last. A refused plan (the safety net) stores nothing and raises an
   alert; ``allow_emptied=True`` runs it after an administrator confirmed.

The reference's rules: the planner keeps past appointments' deletes local; `core.act`
makes completed/cancelled appointments free without reminder on the server, and sends
invitations only for future appointments the user organises. Deleting in the application an
appointment the user only attends is not done from that user's server: the pair is kept
apart instead (the organiser's copy rules).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import (
    FetchedItem,
    ItemCollection,
    ItemStore,
    PreconditionFailed,
)
from serversync.core import rules
from serversync.core.act import (
    ActFilter,
    Appointment,
    ConflictRecord,
    ItemKind,
    Record,
    Task,
    complete_task,
    content_hash,
    for_server,
    in_filter,
    is_past,
    sends_invitations,
)
from serversync.core.errors import ConfigError, ItemError, RuleViolation
from serversync.core.model import Alert, Channel, Mailbox, Profile, Severity, SyncMethod
from serversync.core.plan import Action, Op, Plan, Policy, Side, Status, Version, plan
from serversync.core.rules import Login
from serversync.services.admin import Clock, connect_options, utcnow
from serversync.services.channels import RunSummary
from serversync.store.act import ActStore, Collection, StatusEntry, filter_key, state_hash
from serversync.store.db import Database

log = logging.getLogger(__name__)

StoreFactory = Callable[[Profile, Login, ConnectOptions], AbstractAsyncContextManager[ItemStore]]
CHUNK = 200  # actions per transaction


@dataclass(slots=True)
class _Server:
    """What the server said about one identity in this run."""

    href: str
    etag: str | None
    record: Record


@dataclass(slots=True)
class _Run:
    """Counters and notes of one collection's sync."""

    actions: int = 0
    failures: int = 0
    conflicts: int = 0
    refused: Side | None = None
    notes: list[str] = field(default_factory=list)
    written: dict[str, str | None] = field(default_factory=dict)  # href -> etag we wrote
    removed: set[str] = field(default_factory=set)  # hrefs we deleted
    refused_writes: list[tuple[str, ItemError]] = field(default_factory=list)


class ActService:
    """The application's API for appointments, contacts and tasks, and their sync."""

    def __init__(self, db: Database, stores: Mapping[Any, StoreFactory],
                 clock: Clock = utcnow) -> None:
        self.db = db
        self.stores = dict(stores)
        self.clock = clock

    # ------------------------------------------------------------ the application's API

    async def create(self, record: Record) -> Record:
        """A new record; its UID must be new (UIDs are global, as in iCalendar)."""
        _check(record)
        async with self.db.transaction() as repo:
            act = ActStore(repo.session)
            if await act.find(record.kind, record.uid) is not None:
                raise ConfigError("uid", f"a {record.kind.value} with UID {record.uid!r} exists",
                                  fix="change it instead, or use a new UID")
            return await act.save(dataclasses.replace(record, modified_at=None), now=self.clock())

    async def change(self, record: Record) -> Record:
        _check(record)
        async with self.db.transaction() as repo:
            act = ActStore(repo.session)
            await act.get(record.kind, record.uid)
            return await act.save(dataclasses.replace(record, modified_at=None), now=self.clock())

    async def delete(self, kind: ItemKind, uid: str) -> None:
        async with self.db.transaction() as repo:
            await ActStore(repo.session).delete(kind, uid, now=self.clock())

    async def get(self, kind: ItemKind, uid: str) -> Record:
        async with self.db.transaction() as repo:
            return await ActStore(repo.session).get(kind, uid)

    async def find(self, kind: ItemKind, uid: str) -> Record | None:
        async with self.db.transaction() as repo:
            return await ActStore(repo.session).find(kind, uid)

    async def list_records(self, kind: ItemKind, owner: str | None = None) -> list[Record]:
        async with self.db.transaction() as repo:
            return await ActStore(repo.session).list_records(kind, owner)

    async def set_filter(self, address: str, flt: ActFilter) -> None:
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            assert mailbox.id is not None
            await ActStore(repo.session).set_filter(mailbox.id, flt)

    async def conflicts(self, address: str) -> list[ConflictRecord]:
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            assert mailbox.id is not None
            return await ActStore(repo.session).conflicts(mailbox.id)

    async def quarantine_count(self, address: str) -> int:
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            assert mailbox.id is not None
            return await ActStore(repo.session).quarantine_count(mailbox.id)

    # ------------------------------------------------------------ the sync

    async def sync(self, address: str, *, allow_emptied: bool = False) -> RunSummary:
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            profile = await repo.get_profile(mailbox.profile)
            settings = await repo.get_settings()
            flt = await ActStore(repo.session).get_filter(mailbox.id or 0)
        problem = rules.act_problem(profile, mailbox)
        if problem is not None:
            raise problem  # delegation, POP3, no dav_url, queues: the seed's rules
        if mailbox.act.method is not SyncMethod.SERVER_SIDE or not mailbox.act.enabled:
            raise RuleViolation(f"appointments, contacts and tasks of {mailbox.address} are not "
                                "enabled", fix=f"run Test & Enable: serversync mailbox test "
                                f"{address}", code="not-enabled")
        rules.check_approved(settings, mailbox)
        factory = self.stores.get(profile.kind)
        if factory is None:
            raise RuleViolation(f"appointments, contacts and tasks of {profile.kind.value} "
                                "profiles are not handled here", code="connector-unavailable")
        login = rules.login_for(profile, mailbox, Channel.ACT)
        kinds = flt.kinds()
        if not kinds:
            return RunSummary(detail="the sync filter selects nothing")
        async with factory(profile, login, connect_options(profile)) as store:
            collections = await store.collections(kinds)
            by_href: dict[str, tuple[ItemCollection, list[ItemKind]]] = {}
            for kind, collection in collections.items():
                by_href.setdefault(collection.href, (collection, []))[1].append(kind)
            runs = await asyncio.gather(*(
                self._collection(store, mailbox, profile, flt, collection, kinds_here,
                                 allow_emptied)
                for collection, kinds_here in by_href.values()))
        total = _Run()
        for run in runs:
            total.actions += run.actions
            total.failures += run.failures
            total.conflicts += run.conflicts
            total.notes.extend(run.notes)
        detail = f"{total.actions} changes, {total.conflicts} conflicts"
        if total.notes:
            detail += "; " + "; ".join(total.notes)
        return RunSummary(items=total.actions, failures=total.failures, detail=detail)

    async def _collection(self, store: ItemStore, mailbox: Mailbox, profile: Profile,
                          flt: ActFilter, remote: ItemCollection, kinds: list[ItemKind],
                          allow_emptied: bool) -> _Run:
        assert mailbox.id is not None
        user = (mailbox.username or mailbox.address).lower()
        now = self.clock()
        key = filter_key(flt)
        run = _Run()
        async with self.db.transaction() as repo:
            act = ActStore(repo.session)
            col = await act.collection(mailbox.id, remote.href, kinds)
            status = await act.status(col.id)
            quarantined = await act.quarantined(col.id)
            touched_app: dict[ItemKind, set[str]] = {}
            for kind in kinds:
                touched_app[kind] = await act.touched(col, kind, user, col.filter_key != key)
        changes = await store.changes(remote, col.token)

        # ---- the server side: what changed, read only what we do not already know
        by_href = {s.href: s for s in status.values() if s.href is not None}
        deleted_hrefs = set(changes.deleted)
        if changes.complete:
            listed = {href for href, _ in changes.changed}
            deleted_hrefs |= {h for h in by_href if h not in listed}
        to_read = [href for href, etag in changes.changed
                   if not (href in by_href and etag and by_href[href].etag == etag)
                   and not (href in quarantined and quarantined[href].etag == etag)]
        fetched = await store.get_many(remote, to_read) if to_read else []
        server: dict[str, _Server] = {}
        bad: list[tuple[FetchedItem, str]] = []
        for item in fetched:
            record = item.record
            if record is None:
                bad.append((item, item.problem))
                continue
            if record.kind not in kinds:
                continue  # another kind shares this collection and is not synced
            known = status.get(record.uid)
            if record.uid in server or (known is not None and known.href not in (None, item.href)
                                        and known.href not in deleted_hrefs):
                bad.append((item, f"UID {record.uid!r} is used by another item in the "
                                  "collection too"))
                continue
            server[record.uid] = _Server(item.href, item.etag or None, record)
            old = by_href.get(item.href)
            if old is not None and old.ident != record.uid:
                deleted_hrefs.add(item.href)  # the href now holds another UID
        server_gone = {by_href[h].ident for h in deleted_hrefs if h in by_href} - set(server)
        released = [h for h in quarantined if h in deleted_hrefs
                    or h in {i.href for i in fetched if i.record is not None}]
        if bad or released:
            async with self.db.transaction() as repo:
                act = ActStore(repo.session)
                await act.release(col.id, released)
                for item, reason in bad:
                    alert = await repo.add_alert(Alert(
                        Severity.WARNING, "act-bad-item",
                        f"{mailbox.address}: the server item {item.href} cannot be synced: "
                        f"{reason}", fix="correct or delete the item on the server; it is kept "
                        "in quarantine and retried when it changes", mailbox=mailbox.address,
                        channel=Channel.ACT))
                    await act.quarantine(col.id, item.href, item.etag, item.raw, reason,
                                         alert.id, now)
            run.failures += len(bad)

        touched = set().union(*touched_app.values()) | set(server) | server_gone
        if not touched:
            if changes.token != col.token or col.filter_key != key:
                async with self.db.transaction() as repo:
                    await ActStore(repo.session).save_cursor(col.id, changes.token, key, now)
            return run

        # ---- both sides' versions, then the plan
        kind_of = {i: k for k, idents in touched_app.items() for i in idents}
        kind_of.update({i: s.record.kind for i, s in server.items()})
        kind_of.update({i: status[i].kind for i in touched if i in status})
        app_records: dict[str, tuple[Record, dt.datetime | None]] = {}
        async with self.db.transaction() as repo:
            act = ActStore(repo.session)
            for kind in kinds:
                wanted = sorted(i for i in touched if kind_of.get(i) is kind)
                app_records.update(await act.rows(kind, wanted))
        status_map = {i: Status(s.app_hash, s.server_hash) for i, s in status.items()}
        app: dict[str, Version] = {}
        deleted_at: dict[str, dt.datetime] = {}
        past: dict[str, bool] = {}
        for ident, entry in status.items():
            if ident not in touched and entry.app_hash is not None:
                app[ident] = Version(entry.app_hash, in_filter=not entry.held)
        for ident, (record, gone_at) in app_records.items():
            past[ident] = is_past(record, now)
            if gone_at is not None:
                deleted_at[ident] = gone_at
                continue
            app[ident] = Version(content_hash(record), record.modified_at, past[ident],
                                 in_filter(record, user, flt), _completed(record))
        server_map: dict[str, Version] = {}
        for ident, entry in status.items():
            if ident not in server and ident not in server_gone and entry.server_hash is not None:
                server_map[ident] = Version(entry.server_hash, past=past.get(ident, False))
        for ident, seen in server.items():
            server_map[ident] = Version(content_hash(seen.record), seen.record.modified_at,
                                        is_past(seen.record, now), completed=_completed(seen.record))

        def equal(ident: str) -> bool:
            found = app_records.get(ident)
            return found is not None and ident in server_map and \
                content_hash(for_server(found[0], now)) == server_map[ident].hash

        try:
            policy = Policy(profile.conflict_policy)
        except ValueError as exc:
            raise ConfigError("conflict_policy", f"{profile.conflict_policy!r} is not a policy",
                              fix="use application-wins, server-wins or newest-wins") from exc
        result = plan(status_map, app, server_map, policy=policy,
                      remove_unfiltered=profile.remove_unfiltered, allow_emptied=allow_emptied,
                      app_deleted_at=deleted_at, equal=equal)
        if result.refused is not None:
            await self._refuse(mailbox, remote, result.refused, now)
            run.refused = result.refused
            run.notes.append(f"{remote.href}: refused, the {result.refused.value} side is empty")
            return run
        await self._execute(store, mailbox, user, remote, col, result, status, app_records,
                            server, policy, run, now)

        # ---- remember the filter state of touched pairs that needed no action
        acted = {a.ident for a in result.actions}
        async with self.db.transaction() as repo:
            act = ActStore(repo.session)
            for ident in touched - acted:
                pair = status.get(ident)
                live = app_records.get(ident)
                if pair is None or live is None or live[1] is not None:
                    continue
                entry, found = pair, live
                held = not in_filter(found[0], user, flt)
                state = state_hash(found[0])
                if (entry.held, entry.app_state) != (held, state) and \
                        entry.app_hash == content_hash(found[0]):
                    entry.held, entry.app_state = held, state
                    await act.put_status(col.id, entry)
        token = await self._own_writes_token(store, remote, changes.token, run)
        async with self.db.transaction() as repo:
            await ActStore(repo.session).save_cursor(col.id, token, key, self.clock())
        return run

    @staticmethod
    async def _own_writes_token(store: ItemStore, remote: ItemCollection, token: str | None,
                                run: _Run) -> str | None:
        """The cursor to keep after our own writes.

        The token read before writing predates them; a server whose tokens name a state (as
        Radicale's do) could even hand the same token back for an equal later state and hide
        changes. So after writing we ask again: when all that changed is exactly what we
        wrote and deleted, the newer token is safe to keep; otherwise keep the older one and
        let the next run read the foreign changes.
        """
        if not (run.written or run.removed) or token is None:
            return token
        after = await store.changes(remote, token)
        if after.complete:
            return token
        ours = all(run.written.get(href) == etag and etag for href, etag in after.changed) \
            and set(after.deleted) <= run.removed
        return after.token if ours else token

    async def _refuse(self, mailbox: Mailbox, remote: ItemCollection, side: Side,
                      now: dt.datetime) -> None:
        other = "server" if side is Side.APP else "application"
        async with self.db.transaction() as repo:
            await repo.add_alert(Alert(
                Severity.ERROR, "act-emptied-side",
                f"{mailbox.address}: the {side.value} side of {remote.href} is suddenly empty; "
                f"the sync refused to delete every item on the {other} side",
                fix="if the items were deleted on purpose, run the sync once with "
                    "allow_emptied; otherwise restore them (nothing was changed)",
                mailbox=mailbox.address, channel=Channel.ACT, created_at=now))

    async def _execute(self, store: ItemStore, mailbox: Mailbox, user: str,
                       remote: ItemCollection, col: Collection, result: Plan,
                       status: dict[str, StatusEntry],
                       app_records: dict[str, tuple[Record, dt.datetime | None]],
                       server: dict[str, _Server], policy: Policy, run: _Run,
                       now: dt.datetime) -> None:
        assert mailbox.id is not None
        conflicts = {c.ident: c for c in result.conflicts}
        actions = list(result.actions)
        for start in range(0, len(actions), CHUNK):
            chunk = actions[start:start + CHUNK]
            writes: list[Callable[[ActStore], Any]] = []
            for action in chunk:
                try:
                    write = await self._remote_part(store, user, remote, col, action, status,
                                                    app_records, server, run, now)
                except PreconditionFailed as exc:
                    run.notes.append(f"{action.ident}: {exc.message}")
                    continue  # changed under us: the next sync reads it and plans again
                except ItemError as exc:
                    run.failures += 1
                    run.notes.append(f"{action.ident}: {exc.message}")
                    run.refused_writes.append((action.ident, exc))
                    continue
                writes.append(write)
                run.actions += 1
                conflict = conflicts.get(action.ident)
                if conflict is not None:
                    run.conflicts += 1
                    kind = _kind_of(action.ident, status, app_records, server)
                    record = ConflictRecord(kind, action.ident, conflict.reason,
                                            conflict.winner.value, policy.value, now)
                    writes.append(_conflict_writer(mailbox.id, record))
            async with self.db.transaction() as repo:
                act = ActStore(repo.session)
                await act.preload_status(col.id)
                for kind in col.kinds:
                    await act.preload(kind, [a.ident for a in chunk
                                             if _kind_of(a.ident, status, app_records,
                                                         server) is kind])
                for write in writes:
                    await write(act)
        if run.refused_writes:
            await self._alert_refused(mailbox, run.refused_writes, now)

    async def _alert_refused(self, mailbox: Mailbox, refused: list[tuple[str, ItemError]],
                             now: dt.datetime) -> None:
        """One alert per application record the server cannot take (a rule Exchange has no
        pattern for, a field it refuses): the record stays as it is and is tried again when
        it changes; the alert says which record and what to change. An alert still open for
        the same record and reason is not repeated on every run."""
        async with self.db.transaction() as repo:
            open_alerts = {a.message for a in await repo.list_alerts(mailbox=mailbox.address)
                           if a.code == "act-item-refused"}
            for ident, exc in refused:
                message = (f"{mailbox.address}: the record {ident} cannot be written to the "
                           f"server: {exc.message}")
                if message in open_alerts:
                    continue
                open_alerts.add(message)
                await repo.add_alert(Alert(
                    Severity.WARNING, "act-item-refused", message,
                    exc.fix or "change the record in the application; it is written again "
                                "when it changes", mailbox=mailbox.address,
                    channel=Channel.ACT, created_at=now))

    async def _remote_part(self, store: ItemStore, user: str, remote: ItemCollection,
                           col: Collection, action: Action, status: dict[str, StatusEntry],
                           app_records: dict[str, tuple[Record, dt.datetime | None]],
                           server: dict[str, _Server], run: _Run,
                           now: dt.datetime) -> Callable[[ActStore], Any]:
        """Do the server side of one action now; return the database side for the chunk."""
        ident, op = action.ident, action.op
        entry = status.get(ident)
        seen = server.get(ident)
        found = app_records.get(ident)
        kind = _kind_of(ident, status, app_records, server)
        href = seen.href if seen else entry.href if entry else None
        etag = seen.etag if seen else entry.etag if entry else None
        cid = col.id

        if op is Op.PUT_SERVER:
            assert found is not None
            record = found[0]
            save_app = action.complete and isinstance(record, Task)
            if save_app and isinstance(record, Task):
                record = complete_task(record, now)
            written = await store.put(remote, for_server(record, now), href=href, if_match=etag,
                                      invitations=sends_invitations(record, user, now))
            run.written[written.href] = written.etag

            async def put_server(act: ActStore) -> None:
                saved = await act.save(record, now=now, flush=False) if save_app else record
                await act.put_status(cid, StatusEntry(
                    ident, kind, written.href, written.etag, content_hash(saved),
                    written.hash, state_hash(saved)))
            return put_server

        if op is Op.DELETE_SERVER:
            if href is not None:
                await store.delete(href, if_match=etag)
                run.removed.add(href)

            async def delete_server(act: ActStore) -> None:
                await act.drop_status(cid, ident)
                await act.purge(kind, [ident])
            return delete_server

        if op is Op.PUT_APP:
            assert seen is not None
            incoming = seen.record
            owner = found[0].owner if found is not None and found[0].owner else user
            if action.complete and isinstance(incoming, Task):
                incoming = complete_task(incoming, now)
            incoming = dataclasses.replace(incoming, owner=owner, id=None)
            server_hash = content_hash(seen.record)

            async def put_app(act: ActStore) -> None:
                saved = await act.save(incoming, now=now, flush=False)
                await act.put_status(cid, StatusEntry(ident, kind, seen.href, seen.etag,
                                                      content_hash(saved), server_hash,
                                                      state_hash(saved)))
            return put_app

        if op is Op.DELETE_APP:
            mine = found[0] if found else None
            attendee_only = isinstance(mine, Appointment) and bool(mine.organizer) and \
                mine.organizer.lower() != user

            async def delete_app(act: ActStore) -> None:
                if attendee_only and mine is not None:
                    # only the organiser's copy deletes a meeting for everyone
                    await act.put_status(cid, StatusEntry(ident, kind, None, None,
                                                          content_hash(mine), None,
                                                          state_hash(mine)))
                    return
                if mine is not None and found is not None and found[1] is None:
                    await act.delete(kind, ident, now=now)
                await act.drop_status(cid, ident)
                await act.purge(kind, [ident])
            return delete_app

        if op is Op.LINK:
            assert found is not None and seen is not None
            record, server_hash = found[0], content_hash(seen.record)

            async def link(act: ActStore) -> None:
                await act.put_status(cid, StatusEntry(ident, kind, seen.href, seen.etag,
                                                      content_hash(record), server_hash,
                                                      state_hash(record)))
            return link

        if op is Op.KEEP_SERVER_ONLY:
            assert entry is not None

            async def keep_server(act: ActStore) -> None:
                await act.put_status(cid, dataclasses.replace(entry, app_hash=None,
                                                              app_state=None, held=False))
                await act.purge_now(kind, ident)
            return keep_server

        if op is Op.KEEP_APP_ONLY:
            assert entry is not None

            async def keep_app(act: ActStore) -> None:
                await act.put_status(cid, dataclasses.replace(entry, href=None, etag=None,
                                                              server_hash=None))
            return keep_app

        async def forget(act: ActStore) -> None:  # Op.FORGET
            await act.drop_status(cid, ident)
            await act.purge(kind, [ident])
        return forget


def _conflict_writer(mailbox_id: int, record: ConflictRecord) -> Callable[[ActStore], Any]:
    async def write(act: ActStore) -> None:
        await act.record_conflict(mailbox_id, record)
    return write


def _completed(record: Record) -> bool:
    return isinstance(record, Task) and record.is_completed


def _kind_of(ident: str, status: Mapping[str, StatusEntry],
             app_records: Mapping[str, tuple[Record, dt.datetime | None]],
             server: Mapping[str, _Server]) -> ItemKind:
    if ident in status:
        return status[ident].kind
    if ident in app_records:
        return app_records[ident][0].kind
    return server[ident].record.kind


def _check(record: Record) -> None:
    if not record.uid.strip():
        raise ConfigError("uid", "is empty", fix="give every record a unique UID")
    if not record.owner.strip():
        raise ConfigError("owner", "is empty", fix="name the application user who owns it")
    if isinstance(record, Appointment) and type(record.start) is not type(record.end):
        raise ConfigError("end", "start and end must both be dates (all-day) or both times")


class ActJob:
    """The `ChannelJob` for `Channel.ACT`."""

    def __init__(self, db: Database, stores: Mapping[Any, StoreFactory],
                 clock: Clock = utcnow) -> None:
        self.service = ActService(db, stores, clock)

    async def __call__(self, address: str) -> RunSummary:
        return await self.service.sync(address)

