"""The two-way sync planner for appointments, contacts and tasks: pure, no I/O.

Follows vdirsyncer's algorithm (``reference/peers.md`` §5, ``aesthetics.md`` §1), itself
OfflineIMAP's three-way merge: for every item identity (the iCalendar/vCard UID) we know the
*status* — the content hash each side had when the two last agreed — and each side's
*current* version. Comparing each side with the status tells what changed where:

===================  =====================  ==========================================
application          server                 action
===================  =====================  ==========================================
unchanged            unchanged              nothing
changed              unchanged              put the application's copy on the server
unchanged            changed                put the server's copy in the application
changed              changed                conflict (none when both now say the same)
unchanged            deleted                delete in the application
deleted              unchanged              delete on the server
changed              deleted / vice versa   conflict (delete against change)
new                  absent                 upload; absent / new: import
new                  new (same UID)         link when equal, else conflict
===================  =====================  ==========================================

On top of it, the reference's rules (``dynamics-sss.md`` §3.8):

* a conflict is settled by the profile's policy — ``application-wins``, ``server-wins`` or
  ``newest-wins`` (the later modification wins; a side whose time is unknown loses, so a
  server-side delete, whose time no server reports, never beats an edit) — and every conflict
  is returned in `Plan.conflicts` for the record;
* a task completed on the losing side of a conflict stays completed (``Action.complete``);
* deletes of *past* appointments are not propagated either way: the other copy is kept and
  the pair stops syncing (`Op.KEEP_SERVER_ONLY`, `Op.KEEP_APP_ONLY`);
* a record that leaves the user's sync filter is deleted from the server only with
  ``remove_unfiltered``; otherwise the pair is held as it is while the record is outside;
* the safety net: when a side that had synced items is suddenly empty and the plan would
  delete on the other side, nothing is done and `Plan.refused` names the emptied side, so the
  caller raises an alert (vdirsyncer's ``StorageEmpty``); ``allow_emptied`` overrides it
  after an administrator confirmed.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class Side(enum.StrEnum):
    APP = "application"
    SERVER = "server"


class Policy(enum.StrEnum):
    APPLICATION_WINS = "application-wins"
    SERVER_WINS = "server-wins"
    NEWEST_WINS = "newest-wins"


class Op(enum.StrEnum):
    PUT_SERVER = "put-server"  # create or update the server copy from the application's
    PUT_APP = "put-app"  # create or update the application record from the server's
    DELETE_SERVER = "delete-server"
    DELETE_APP = "delete-app"
    LINK = "link"  # both sides say the same: record the status
    FORGET = "forget"  # both gone, or the server copy is gone for an unfiltered record
    KEEP_SERVER_ONLY = "keep-server-only"  # application deleted a past item: keep the server's
    KEEP_APP_ONLY = "keep-app-only"  # server deleted a past item: keep the application's


@dataclass(frozen=True, slots=True)
class Status:
    """What both sides held when they last agreed. ``None`` marks a side deliberately no longer
    synced (its copy was deleted and the delete was not propagated)."""

    app_hash: str | None
    server_hash: str | None


@dataclass(frozen=True, slots=True)
class Version:
    """One side's current copy of an item, reduced to what the planner needs."""

    hash: str
    modified: dt.datetime | None = None
    past: bool = False  # a past appointment: its deletes are not propagated
    in_filter: bool = True  # application side: inside the user's sync filter
    completed: bool = False  # a completed task


@dataclass(frozen=True, slots=True)
class Action:
    op: Op
    ident: str
    complete: bool = False  # mark the written copy completed (a task completed on the loser)


@dataclass(frozen=True, slots=True)
class Conflict:
    ident: str
    reason: str
    winner: Side


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    refused: Side | None = None  # the side found emptied; nothing was planned

    def ops(self) -> dict[str, Op]:
        return {a.ident: a.op for a in self.actions}


def _winner(policy: Policy, app_time: dt.datetime | None,
            server_time: dt.datetime | None) -> Side:
    if policy is Policy.APPLICATION_WINS:
        return Side.APP
    if policy is Policy.SERVER_WINS:
        return Side.SERVER
    if server_time is None:
        return Side.APP
    if app_time is None:
        return Side.SERVER
    return Side.SERVER if server_time > app_time else Side.APP  # a tie goes to the application


class _Planner:
    def __init__(self, policy: Policy, remove_unfiltered: bool,
                 app_deleted_at: Mapping[str, dt.datetime],
                 equal: Callable[[str], bool]) -> None:
        self.policy = policy
        self.remove_unfiltered = remove_unfiltered
        self.app_deleted_at = app_deleted_at
        self.equal = equal
        self.actions: list[Action] = []
        self.conflicts: list[Conflict] = []

    def add(self, op: Op, ident: str, complete: bool = False) -> None:
        self.actions.append(Action(op, ident, complete))

    def conflict(self, ident: str, reason: str, app_time: dt.datetime | None,
                 server_time: dt.datetime | None) -> Side:
        side = _winner(self.policy, app_time, server_time)
        self.conflicts.append(Conflict(ident, reason, side))
        return side

    def both_present(self, ident: str, a: Version, s: Version) -> None:
        if self.equal(ident):
            self.add(Op.LINK, ident)
            return
        if self.conflict(ident, "changed on both sides", a.modified, s.modified) is Side.APP:
            self.add(Op.PUT_SERVER, ident, complete=s.completed and not a.completed)
        else:
            self.add(Op.PUT_APP, ident, complete=a.completed and not s.completed)

    def new(self, ident: str, a: Version | None, s: Version | None) -> None:
        if a is not None and not a.in_filter:
            return  # outside the filter and not linked: neither side is ours to touch
        if a is not None and s is not None:
            self.both_present(ident, a, s)
        elif a is not None:
            self.add(Op.PUT_SERVER, ident)
        elif s is not None:
            self.add(Op.PUT_APP, ident)

    def linked(self, ident: str, st: Status, a: Version | None, s: Version | None) -> None:
        if st.app_hash is None or st.server_hash is None:
            kept_present = s if st.app_hash is None else a
            other_present = a if st.app_hash is None else s
            if other_present is not None and other_present.in_filter:
                self.new(ident, a, s)  # the side that was let go has a copy again: start over
            elif kept_present is None:
                self.add(Op.FORGET, ident)
            return
        if a is not None and not a.in_filter:
            if s is None:
                self.add(Op.FORGET, ident)
            elif self.remove_unfiltered and not s.past:
                self.add(Op.DELETE_SERVER, ident)
            return  # held: the record is outside the filter and the server copy stays
        if a is None and s is None:
            self.add(Op.FORGET, ident)
        elif a is not None and s is not None:
            app_changed, server_changed = a.hash != st.app_hash, s.hash != st.server_hash
            if app_changed and server_changed:
                self.both_present(ident, a, s)
            elif app_changed:
                self.add(Op.PUT_SERVER, ident)
            elif server_changed:
                self.add(Op.PUT_APP, ident)
        elif a is not None:  # deleted on the server
            if a.past:
                self.add(Op.KEEP_APP_ONLY, ident)
            elif a.hash != st.app_hash and self.conflict(
                    ident, "changed in the application, deleted on the server",
                    a.modified, None) is Side.APP:
                self.add(Op.PUT_SERVER, ident)
            else:
                self.add(Op.DELETE_APP, ident)
        else:  # deleted in the application
            assert s is not None
            if s.past:
                self.add(Op.KEEP_SERVER_ONLY, ident)
            elif s.hash == st.server_hash or self.conflict(
                    ident, "deleted in the application, changed on the server",
                    self.app_deleted_at.get(ident), s.modified) is Side.APP:
                self.add(Op.DELETE_SERVER, ident)
            else:
                self.add(Op.PUT_APP, ident)


def plan(status: Mapping[str, Status], app: Mapping[str, Version],
         server: Mapping[str, Version], *, policy: Policy = Policy.APPLICATION_WINS,
         remove_unfiltered: bool = False, allow_emptied: bool = False,
         app_deleted_at: Mapping[str, dt.datetime] | None = None,
         equal: Callable[[str], bool] | None = None) -> Plan:
    """Decide what to do for every identity known to the status or to either side.

    ``app`` holds the application's live records (with ``in_filter`` set); ``server`` the
    server's items; ``app_deleted_at`` when the application deleted a record (tombstones,
    for ``newest-wins``); ``equal(ident)`` says whether the application's record, as it would
    be written to the server, equals the server's copy — asked only when both changed or both
    are new, because answering it costs a render and a parse.
    """
    planner = _Planner(policy, remove_unfiltered, app_deleted_at or {},
                       equal or (lambda _ident: False))
    for ident in sorted(status.keys() | app.keys() | server.keys()):
        st, a, s = status.get(ident), app.get(ident), server.get(ident)
        if st is None:
            planner.new(ident, a, s)
        else:
            planner.linked(ident, st, a, s)
    result = Plan(tuple(planner.actions), tuple(planner.conflicts))
    if allow_emptied:
        return result
    ops = {a.op for a in result.actions}
    server_had = any(st.server_hash is not None for st in status.values())
    app_had = any(st.app_hash is not None for st in status.values())
    if server_had and not server and Op.DELETE_APP in ops:
        return Plan(refused=Side.SERVER)
    if app_had and not any(v.in_filter for v in app.values()) and Op.DELETE_SERVER in ops:
        return Plan(refused=Side.APP)
    return result
