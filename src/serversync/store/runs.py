"""Sync runs and per-channel schedules: the tables and all their SQL.

``sync_runs`` records every run of every mailbox channel (start, end, items, failures,
outcome, error) — the reference's alert wall and "Download Mailbox Details" in one table
(``dynamics-sss.md`` §4). ``channel_schedules`` holds one row per mailbox channel that has
ever been scheduled: when it runs next and why, its last success, its backoff and any
pending "sync now" request; `core.schedule.ScheduleState` is its value type. A channel
without a row has never run and is due at once.

`RunStore` works on the session of a `store.repos.Repository` (one transaction) and returns
`core.schedule` types, never rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.core.errors import NotFound
from serversync.core.model import ApprovalStatus, Channel, ChannelStatus, SyncMethod
from serversync.core.schedule import ChannelSchedule, Outcome, Run, ScheduleState
from serversync.core.times import utc
from serversync.store.tables import Base, MailboxRow, ProfileRow


class SyncRunRow(Base):
    __tablename__ = "sync_runs"
    __table_args__ = (Index("ix_sync_runs_mailbox_channel", "mailbox_id", "channel", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(10))
    started_at: Mapped[dt.datetime] = mapped_column(index=True)
    finished_at: Mapped[dt.datetime | None]
    items: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(10))  # None while running
    error_code: Mapped[str | None] = mapped_column(String(50))
    error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text, default="")
    worker: Mapped[str] = mapped_column(String(100), default="")


class ChannelScheduleRow(Base):
    __tablename__ = "channel_schedules"
    __table_args__ = (UniqueConstraint("mailbox_id", "channel", name="uq_channel_schedules_mailbox"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(10))
    next_run_at: Mapped[dt.datetime | None] = mapped_column(index=True)
    last_run_at: Mapped[dt.datetime | None]
    last_success_at: Mapped[dt.datetime | None]
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    idle_runs: Mapped[int] = mapped_column(Integer, default=0)
    backoff_until: Mapped[dt.datetime | None]
    last_error_code: Mapped[str | None] = mapped_column(String(50))
    last_error: Mapped[str | None] = mapped_column(Text)
    why: Mapped[str] = mapped_column(Text, default="")
    requested_at: Mapped[dt.datetime | None]  # a pending "sync now"
    running_since: Mapped[dt.datetime | None]  # a run is in progress (for the UI)


@dataclass(frozen=True, slots=True)
class DueChannel:
    """A mailbox channel the scheduler should run now."""

    mailbox: str
    channel: Channel
    profile: str
    next_run_at: dt.datetime | None
    requested: bool = False


@dataclass(frozen=True, slots=True)
class OpenSchedule:
    """A channel's schedule row as read when a run opens (`RunStore.schedule`)."""

    id: int | None  # None: the channel never ran (no row yet)
    state: ScheduleState
    running_since: dt.datetime | None
    requested_at: dt.datetime | None


_STATE_FIELDS = ("next_run_at", "last_run_at", "last_success_at", "consecutive_failures",
                 "idle_runs", "backoff_until", "last_error_code", "last_error", "why")


def _state(row: ChannelScheduleRow | None) -> ScheduleState:
    if row is None:
        return ScheduleState()
    return ScheduleState(
        next_run_at=utc(row.next_run_at), last_run_at=utc(row.last_run_at),
        last_success_at=utc(row.last_success_at), consecutive_failures=row.consecutive_failures,
        idle_runs=row.idle_runs, backoff_until=utc(row.backoff_until),
        last_error_code=row.last_error_code, last_error=row.last_error, why=row.why)


def _run(row: SyncRunRow, address: str) -> Run:
    return Run(id=row.id, mailbox=address, channel=Channel(row.channel),
               started_at=utc(row.started_at) or row.started_at,
               finished_at=utc(row.finished_at), items=row.items, failures=row.failures,
               outcome=None if row.outcome is None else Outcome(row.outcome),
               error_code=row.error_code, error=row.error, detail=row.detail, worker=row.worker)


_RUNS = cast(Table, SyncRunRow.__table__)
_SCHEDULES = cast(Table, ChannelScheduleRow.__table__)
_S = _SCHEDULES.c
_INTERRUPTED = ("the run was interrupted (the process stopped or was killed); its uncommitted "
                "batch was rolled back and is synced again")
# The statements of a run's bookkeeping, built once: Core, not the ORM, and no statement
# construction per run (a no-change poll of 1,000 mailboxes runs them 1,000 times a cycle).
_READ_SCHEDULE = select(_S.id, _S.running_since, _S.requested_at,
                        *(_S[name] for name in _STATE_FIELDS)).where(
    _S.mailbox_id == bindparam("b_mailbox_id"), _S.channel == bindparam("b_channel"))
_NEW_SCHEDULE = insert(_SCHEDULES).values(
    mailbox_id=bindparam("b_mailbox_id"), channel=bindparam("b_channel"), consecutive_failures=0,
    idle_runs=0, why="", running_since=bindparam("b_now"))
_MARK_RUNNING = update(_SCHEDULES).where(_S.id == bindparam("b_schedule_id")).values(
    running_since=bindparam("b_now"))
_MARK_RUNNING_SERVED = update(_SCHEDULES).where(_S.id == bindparam("b_schedule_id")).values(
    running_since=bindparam("b_now"), requested_at=None)
_CLOSE_OPEN_RUNS = update(_RUNS).where(
    _RUNS.c.mailbox_id == bindparam("b_mailbox_id"), _RUNS.c.channel == bindparam("b_channel"),
    _RUNS.c.outcome.is_(None)).values(
    outcome=Outcome.TRANSIENT.value, finished_at=bindparam("b_now"), error_code="interrupted",
    error=_INTERRUPTED)
_NEW_RUN = insert(_RUNS).values(
    mailbox_id=bindparam("b_mailbox_id"), channel=bindparam("b_channel"),
    started_at=bindparam("b_now"), items=0, failures=0, detail="", worker=bindparam("b_worker"))
_FINISH_RUN = update(_RUNS).where(_RUNS.c.id == bindparam("b_run_id")).values(
    finished_at=bindparam("b_now"), items=bindparam("b_items"), failures=bindparam("b_failures"),
    outcome=bindparam("b_outcome"), error_code=bindparam("b_error_code"),
    error=bindparam("b_error"), detail=bindparam("b_detail"))
_SAVE_STATE_DONE = update(_SCHEDULES).where(
    _S.mailbox_id == bindparam("b_mailbox_id"), _S.channel == bindparam("b_channel")).values(
    running_since=None, **{name: bindparam(f"b_s_{name}") for name in _STATE_FIELDS})


class RunStore:
    """All SQL for runs and schedules, inside one session (one transaction)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        # Within one transaction a mailbox's id and its schedule row do not change: a run's
        # bookkeeping asks for them several times, and every statement counts when 1,000
        # mailboxes are polled in a cycle.
        self._ids: dict[str, int] = {}
        self._rows: dict[tuple[int, str], ChannelScheduleRow] = {}

    def know(self, address: str, mailbox_id: int) -> None:
        """Tell the store a mailbox's id (the caller read the mailbox in this transaction)."""
        self._ids[address.strip().lower()] = mailbox_id

    async def _mailbox_id(self, address: str) -> int:
        key = address.strip().lower()
        if key in self._ids:
            return self._ids[key]
        found = await self.session.scalar(select(MailboxRow.id).where(MailboxRow.address == key))
        if found is None:
            raise NotFound(f"no mailbox {address!r}", fix="list them with: serversync mailbox list")
        self._ids[key] = int(found)
        return int(found)

    async def _row(self, mailbox_id: int, channel: Channel) -> ChannelScheduleRow | None:
        cached = self._rows.get((mailbox_id, channel.value))
        if cached is not None:
            return cached
        row: ChannelScheduleRow | None = await self.session.scalar(
            select(ChannelScheduleRow).where(ChannelScheduleRow.mailbox_id == mailbox_id,
                                             ChannelScheduleRow.channel == channel.value))
        if row is not None:
            self._rows[(mailbox_id, channel.value)] = row
        return row

    async def _row_or_new(self, mailbox_id: int, channel: Channel) -> ChannelScheduleRow:
        row = await self._row(mailbox_id, channel)
        if row is None:
            row = ChannelScheduleRow(mailbox_id=mailbox_id, channel=channel.value,
                                     consecutive_failures=0, idle_runs=0, why="")
            self.session.add(row)
            self._rows[(mailbox_id, channel.value)] = row
        return row

    # ------------------------------------------------------------ schedule state

    async def state(self, address: str, channel: Channel) -> ScheduleState:
        return _state(await self._row(await self._mailbox_id(address), channel))

    async def save_state(self, address: str, channel: Channel, state: ScheduleState) -> None:
        row = await self._row_or_new(await self._mailbox_id(address), channel)
        for name in _STATE_FIELDS:
            setattr(row, name, getattr(state, name))
        await self.session.flush()

    async def request(self, address: str, channel: Channel, now: dt.datetime,
                      state: ScheduleState) -> None:
        """Store a "sync now": the new state (due now) and when it was asked for."""
        row = await self._row_or_new(await self._mailbox_id(address), channel)
        for name in _STATE_FIELDS:
            setattr(row, name, getattr(state, name))
        row.requested_at = now
        await self.session.flush()

    # ------------------------------------------------------------ runs

    async def schedule(self, mailbox_id: int, channel: Channel) -> OpenSchedule:
        """The channel's schedule row, for `open_run` (one Core ``SELECT``)."""
        row = (await self.session.execute(
            _READ_SCHEDULE, {"b_mailbox_id": mailbox_id, "b_channel": channel.value})).first()
        if row is None:
            return OpenSchedule(None, ScheduleState(), None, None)
        return OpenSchedule(row[0], ScheduleState(
            next_run_at=utc(row[3]), last_run_at=utc(row[4]), last_success_at=utc(row[5]),
            consecutive_failures=row[6], idle_runs=row[7], backoff_until=utc(row[8]),
            last_error_code=row[9], last_error=row[10], why=row[11]), row[1], utc(row[2]))

    async def open_run(self, mailbox_id: int, channel: Channel, schedule: OpenSchedule,
                       now: dt.datetime, worker: str = "") -> int:
        """Open a run (committed by the caller before the job starts, so that a run that
        dies leaves this row; the next `open_run` closes it as interrupted).

        ``schedule`` as read by `schedule` in this transaction. Two or three statements:
        the new run row, the schedule's ``running_since`` (and a "sync now" made before
        ``now`` is served by this run), and — only when a run was left open — closing it.
        """
        key = {"b_mailbox_id": mailbox_id, "b_channel": channel.value, "b_now": now}
        if schedule.id is None:  # first run: make the row, close any open run (old schema)
            await self.session.execute(_NEW_SCHEDULE, key)
            await self.session.execute(_CLOSE_OPEN_RUNS, key)
        else:
            if schedule.running_since is not None:  # a run was left open: interrupted
                await self.session.execute(_CLOSE_OPEN_RUNS, key)
            served = schedule.requested_at is not None and schedule.requested_at <= now
            await self.session.execute(_MARK_RUNNING_SERVED if served else _MARK_RUNNING,
                                       {"b_schedule_id": schedule.id, "b_now": now})
        result: Any = await self.session.execute(_NEW_RUN, {**key, "b_worker": worker[:100]})
        return int(result.inserted_primary_key[0])

    async def close_run(self, run: Run, mailbox_id: int, state: ScheduleState) -> None:
        """Record a finished run and its channel's next state (two Core UPDATE statements).

        ``run`` carries the outcome; the schedule's ``running_since`` is cleared with the
        state. NotFound when the run row is gone (its mailbox was deleted meanwhile).
        """
        result: Any = await self.session.execute(_FINISH_RUN, {
            "b_run_id": run.id, "b_now": run.finished_at, "b_items": run.items,
            "b_failures": run.failures, "b_outcome": run.outcome.value if run.outcome else None,
            "b_error_code": run.error_code, "b_error": run.error, "b_detail": run.detail[:2000]})
        if not result.rowcount:
            raise NotFound(f"no sync run {run.id}")
        await self.session.execute(_SAVE_STATE_DONE, {
            "b_mailbox_id": mailbox_id, "b_channel": run.channel.value,
            **{f"b_s_{name}": getattr(state, name) for name in _STATE_FIELDS}})

    async def start_run(self, address: str, channel: Channel, now: dt.datetime,
                        worker: str = "") -> int:
        """Open a run. Runs of this channel still open were interrupted (a killed worker)."""
        mailbox_id = await self._mailbox_id(address)
        row = self._rows.pop((mailbox_id, channel.value), None)
        if row is not None:  # read through the ORM in this transaction: not stale after
            self.session.expire(row)  # the Core statements below
        return await self.open_run(mailbox_id, channel, await self.schedule(mailbox_id, channel),
                                   now, worker)

    async def finish_run(self, run_id: int, now: dt.datetime, *, items: int, failures: int,
                         outcome: Outcome, error_code: str | None = None,
                         error: str | None = None, detail: str = "",
                         address: str | None = None) -> Run:
        row = await self.session.get(SyncRunRow, run_id)
        if row is None:
            raise NotFound(f"no sync run {run_id}")
        row.finished_at, row.items, row.failures = now, items, failures
        row.outcome, row.error_code, row.error = outcome.value, error_code, error
        row.detail = detail[:2000]
        schedule = self._rows.get((row.mailbox_id, row.channel))
        if schedule is not None:  # loaded already (the runner read the state): written
            schedule.running_since = None  # with it at the next flush, one UPDATE
        else:
            await self.session.execute(
                update(ChannelScheduleRow)
                .where(ChannelScheduleRow.mailbox_id == row.mailbox_id,
                       ChannelScheduleRow.channel == row.channel)
                .values(running_since=None))
            await self.session.flush()
        if address is None:
            address = await self.session.scalar(
                select(MailboxRow.address).where(MailboxRow.id == row.mailbox_id))
        return _run(row, address or "")

    async def recent(self, *, mailbox: str | None = None, channel: Channel | None = None,
                     limit: int = 100) -> list[Run]:
        query = (select(SyncRunRow, MailboxRow.address).join(MailboxRow)
                 .order_by(SyncRunRow.started_at.desc(), SyncRunRow.id.desc()).limit(limit))
        if mailbox is not None:
            query = query.where(MailboxRow.address == mailbox.strip().lower())
        if channel is not None:
            query = query.where(SyncRunRow.channel == channel.value)
        return [_run(r, a) for r, a in (await self.session.execute(query)).all()]

    async def runs_since(self, since: dt.datetime) -> list[Run]:
        query = (select(SyncRunRow, MailboxRow.address).join(MailboxRow)
                 .where(SyncRunRow.started_at >= since).order_by(SyncRunRow.started_at))
        return [_run(r, a) for r, a in (await self.session.execute(query)).all()]

    async def failed_mailboxes(self, profile: str, since: dt.datetime) -> set[str]:
        """Mailboxes of ``profile`` with a failed run since ``since``."""
        query = (select(MailboxRow.address).distinct()
                 .join(SyncRunRow, SyncRunRow.mailbox_id == MailboxRow.id)
                 .join(ProfileRow, MailboxRow.profile_id == ProfileRow.id)
                 .where(ProfileRow.name == profile, SyncRunRow.started_at >= since,
                        SyncRunRow.outcome.in_([Outcome.TRANSIENT.value, Outcome.PERMANENT.value])))
        return set(await self.session.scalars(query))

    async def prune(self, before: dt.datetime) -> int:
        """Forget finished runs older than ``before`` (the runs table is a log, not history)."""
        result: Any = await self.session.execute(
            delete(SyncRunRow).where(SyncRunRow.started_at < before,
                                     SyncRunRow.outcome.is_not(None)))
        return int(result.rowcount or 0)

    # ------------------------------------------------------------ what is due

    @staticmethod
    def _enabled(channel: Channel, approved_only: bool) -> Any:
        prefix = channel.value
        condition = and_(getattr(MailboxRow, f"{prefix}_method") == SyncMethod.SERVER_SIDE.value,
                         getattr(MailboxRow, f"{prefix}_enabled").is_(True))
        if approved_only:
            condition = and_(condition, MailboxRow.approval == ApprovalStatus.APPROVED.value)
        return condition

    async def due(self, now: dt.datetime, *, approved_only: bool = True,
                  channels: Sequence[Channel] = tuple(Channel), limit: int = 1000,
                  exclude: set[tuple[str, Channel]] | None = None) -> list[DueChannel]:
        """Enabled channels whose time has come (or that never ran), soonest first."""
        found: list[DueChannel] = []
        for channel in channels:
            query = (select(MailboxRow.address, ProfileRow.name, ChannelScheduleRow.next_run_at,
                            ChannelScheduleRow.requested_at)
                     .join(ProfileRow, MailboxRow.profile_id == ProfileRow.id)
                     .outerjoin(ChannelScheduleRow,
                                and_(ChannelScheduleRow.mailbox_id == MailboxRow.id,
                                     ChannelScheduleRow.channel == channel.value))
                     .where(self._enabled(channel, approved_only),
                            or_(ChannelScheduleRow.id.is_(None),
                                ChannelScheduleRow.next_run_at.is_(None),
                                ChannelScheduleRow.next_run_at <= now))
                     .order_by(ChannelScheduleRow.next_run_at.is_not(None),
                               ChannelScheduleRow.next_run_at)
                     .limit(limit))
            for address, profile, next_run_at, requested_at in (await self.session.execute(query)).all():
                if exclude and (address, channel) in exclude:
                    continue
                found.append(DueChannel(address, channel, profile, utc(next_run_at),
                                        requested_at is not None))
        found.sort(key=lambda d: (d.next_run_at is not None,
                                  d.next_run_at or dt.datetime.min.replace(tzinfo=dt.UTC)))
        return found[:limit]

    async def next_due_at(self, *, approved_only: bool = True) -> dt.datetime | None:
        """The earliest next run among enabled channels (None: nothing scheduled)."""
        best: dt.datetime | None = None
        for channel in Channel:
            value = await self.session.scalar(
                select(func.min(ChannelScheduleRow.next_run_at))
                .join(MailboxRow, ChannelScheduleRow.mailbox_id == MailboxRow.id)
                .where(ChannelScheduleRow.channel == channel.value,
                       self._enabled(channel, approved_only)))
            value = utc(value)
            if value is not None and (best is None or value < best):
                best = value
        return best

    async def schedules(self, mailbox: str | None = None,
                        profile: str | None = None) -> list[ChannelSchedule]:
        """Every server-side channel of every mailbox (or one), with its schedule."""
        query = select(MailboxRow, ProfileRow.name).join(ProfileRow).order_by(MailboxRow.address)
        if mailbox is not None:
            query = query.where(MailboxRow.address == mailbox.strip().lower())
        if profile is not None:
            query = query.where(ProfileRow.name == profile)
        mailboxes = (await self.session.execute(query)).all()
        ids = [m.id for m, _ in mailboxes]
        rows: dict[tuple[int, str], ChannelScheduleRow] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for row in await self.session.scalars(
                    select(ChannelScheduleRow).where(ChannelScheduleRow.mailbox_id.in_(chunk))):
                rows[(row.mailbox_id, row.channel)] = row
        result: list[ChannelSchedule] = []
        for m, profile_name in mailboxes:
            for channel in Channel:
                prefix = channel.value
                if getattr(m, f"{prefix}_method") != SyncMethod.SERVER_SIDE.value:
                    continue
                enabled = bool(getattr(m, f"{prefix}_enabled"))
                found = rows.get((m.id, prefix))
                state = _state(found)
                why = state.why
                if not enabled:
                    why = (state.why if state.why.startswith("disabled")
                           else "disabled: run Test & Enable, or enable the channel")
                elif m.approval != ApprovalStatus.APPROVED.value:
                    why = f"waiting for approval of the address ({m.approval})"
                result.append(ChannelSchedule(
                    mailbox=m.address, channel=channel, next_run_at=state.next_run_at,
                    last_success_at=state.last_success_at, last_error=state.last_error,
                    consecutive_failures=state.consecutive_failures, why=why,
                    profile=profile_name, enabled=enabled,
                    status=ChannelStatus(getattr(m, f"{prefix}_status")),
                    last_run_at=state.last_run_at, last_error_code=state.last_error_code,
                    backoff_until=state.backoff_until,
                    requested_at=utc(found.requested_at) if found else None,
                    running_since=utc(found.running_since) if found else None))
        return result

    async def mailbox_statuses(self) -> dict[str, int]:
        """Mailboxes by health: failure if any server-side channel failed, else disabled (no
        channel enabled), success (every enabled channel succeeded) or not-run."""
        counts = {"success": 0, "failure": 0, "not-run": 0, "disabled": 0}
        for m in await self.session.scalars(select(MailboxRow)):
            synced = [c.value for c in Channel
                      if getattr(m, f"{c.value}_method") == SyncMethod.SERVER_SIDE.value]
            enabled = [c for c in synced if getattr(m, f"{c}_enabled")]
            statuses = {getattr(m, f"{c}_status") for c in enabled}
            if any(getattr(m, f"{c}_status") == ChannelStatus.FAILURE.value for c in synced):
                counts["failure"] += 1  # disabled by a failure counts as failing, not disabled
            elif not enabled:
                counts["disabled"] += 1
            elif statuses == {ChannelStatus.SUCCESS.value}:
                counts["success"] += 1
            else:
                counts["not-run"] += 1
        return counts
