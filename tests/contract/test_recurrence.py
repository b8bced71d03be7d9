"""The recurring-item contract, for every backend (CalDAV, EWS, Graph).

A weekly meeting with one cancelled and one moved occurrence, a monthly "last Friday" series
and a weekly task go from the application to the server and are read back through the same
backend's item store; what they *mean* must survive: the same occurrence starts (expanded in
the series' time zone), the same cancellations, the same moved instance with its own
subject. Each backend stores the rule its own way (CalDAV keeps the RRULE text, Exchange a
pattern), so the contract compares expansions, not strings. A second sync changes nothing
(the read-back hashes equal what was written: no sync loop), and a change on one side —
another cancelled occurrence in the application — reaches the server as one item.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from zoneinfo import ZoneInfo

from serversync import wiring
from serversync.core import rules
from serversync.core.act import Appointment, ItemKind, Occurrence, Record, Task, as_instant
from serversync.core.model import Channel
from serversync.core.recurrence import starts
from serversync.services.act import ActService
from serversync.services.admin import connect_options
from tests.contract.backends import Backend

ZONE = "Europe/Berlin"


def _monday_after(days: int) -> dt.datetime:
    day = dt.date.today() + dt.timedelta(days=days)
    day += dt.timedelta(days=(7 - day.weekday()) % 7)
    return dt.datetime.combine(day, dt.time(9, 30), ZoneInfo(ZONE))


def weekly(owner: str) -> Appointment:
    start = _monday_after(10)
    return Appointment(
        uid="series-weekly", subject="Team call", start=start,
        end=start + dt.timedelta(minutes=45), timezone=ZONE, organizer=owner, owner=owner,
        rrule="FREQ=WEEKLY;BYDAY=MO;COUNT=8",
        cancelled_occurrences=(start + dt.timedelta(weeks=2),),
        occurrences=(Occurrence(start + dt.timedelta(weeks=3),
                                start + dt.timedelta(weeks=3, days=1),
                                start + dt.timedelta(weeks=3, days=1, minutes=45),
                                "Team call (moved)", "Room 2"),))


def monthly(owner: str) -> Appointment:
    first = dt.date.today().replace(day=1) + dt.timedelta(days=40)
    day = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
    day -= dt.timedelta(days=(day.weekday() - 4) % 7)  # the month's last Friday
    start = dt.datetime.combine(day, dt.time(16), ZoneInfo(ZONE))
    return Appointment(uid="series-monthly", subject="Month close", start=start,
                       end=start + dt.timedelta(hours=1), timezone=ZONE, organizer=owner,
                       owner=owner, rrule="FREQ=MONTHLY;BYDAY=-1FR")


def chore(owner: str) -> Task:
    due = _monday_after(3).date() + dt.timedelta(days=4)  # a Friday
    return Task(uid="series-task", subject="Weekly report", due=due, owner=owner,
                rrule="FREQ=WEEKLY;BYDAY=FR")


def meaning(record: Record, count: int = 12) -> tuple[object, ...]:
    """What a recurring record says, independent of how a server spells the rule."""
    if isinstance(record, Task):  # Exchange and To Do keep a task's due *day*
        anchor = record.due
        assert anchor is not None
        return (record.subject, tuple(as_instant(d).date() for d in itertools.islice(
            starts(record.rrule, anchor, "UTC"), count)))
    assert isinstance(record, Appointment)
    expanded = [as_instant(s) for s in itertools.islice(
        starts(record.rrule, record.start, record.timezone), count)]
    cancelled = {as_instant(c) for c in record.cancelled_occurrences}
    moved = {as_instant(o.recurrence_id): (as_instant(o.start), as_instant(o.end), o.subject)
             for o in record.occurrences}
    return (record.subject, as_instant(record.end) - as_instant(record.start),
            tuple((s, s in cancelled, moved.get(s)) for s in expanded))


async def server_records(backend: Backend, kind: ItemKind) -> dict[str, Record]:
    """The items of ``kind`` as the backend's own item store reads them from the server."""
    async with backend.db.transaction() as repo:
        mailbox = await repo.get_mailbox(backend.user)
        profile = await repo.get_profile(mailbox.profile)
    login = rules.login_for(profile, mailbox, Channel.ACT)
    async with wiring.ACT_STORES[profile.kind](profile, login, connect_options(profile)) as store:
        collection = (await store.collections([kind]))[kind]
        listing = await store.changes(collection, None)
        fetched = await store.get_many(collection, [href for href, _ in listing.changed])
    assert all(f.record is not None for f in fetched), [f.problem for f in fetched]
    return {f.record.uid: f.record for f in fetched if f.record is not None}


async def test_recurring_series_and_tasks_keep_their_meaning(backend: Backend) -> None:
    await backend.setup(Channel.ACT)
    act = ActService(backend.db, wiring.ACT_STORES)
    made = [weekly(backend.user), monthly(backend.user), chore(backend.user)]
    for record in made:
        await act.create(record)
    summary = await act.sync(backend.user)
    assert (summary.items, summary.failures) == (3, 0), summary
    again = await act.sync(backend.user)
    assert (again.items, again.failures) == (0, 0), again  # read-back hashes match: no loop

    events = await server_records(backend, ItemKind.APPOINTMENT)
    tasks = await server_records(backend, ItemKind.TASK)
    for record in made:
        there = (tasks if isinstance(record, Task) else events)[record.uid]
        assert meaning(there) == meaning(record), record.uid

    # one more occurrence cancelled in the application: one item goes out, then quiet
    series = await act.get(ItemKind.APPOINTMENT, "series-weekly")
    assert isinstance(series, Appointment)
    assert isinstance(series.start, dt.datetime)
    changed = dataclasses.replace(series, cancelled_occurrences=(
        *series.cancelled_occurrences, series.start + dt.timedelta(weeks=5)))
    await act.change(changed)
    summary = await act.sync(backend.user)
    assert (summary.items, summary.failures) == (1, 0), summary
    assert (await act.sync(backend.user)).items == 0
    there = (await server_records(backend, ItemKind.APPOINTMENT))["series-weekly"]
    assert meaning(there) == meaning(changed)
