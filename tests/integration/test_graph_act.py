"""Two-way sync of appointments, recurring series, contacts and tasks with Exchange Online.

Verified only against the loopback Graph server (`tests.fakes.graph_server`, its events in
`tests.fakes.graph_calendar`). The ACT job (services.act, the same one that runs against
Radicale) drives `connectors.graph_items.GraphItemStore`: application → server creates carry
our UID in a single-value extended property, server-side changes come back through the event
listing and the contacts delta, server-created items are imported, deletes propagate both
ways, and a stale ETag is refused with 412. Recurring series go both ways with their
cancelled and moved occurrences, in their own time zone across a change of daylight saving,
with the exact requests Microsoft documents asserted; what Exchange cannot store is refused
naming the rule while the rest syncs.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from serversync import wiring
from serversync.connectors import graph_items
from serversync.connectors.protocols import PreconditionFailed
from serversync.core.act import (
    Appointment,
    Contact,
    ItemKind,
    Occurrence,
    Phone,
    Task,
    TaskStatus,
    content_hash,
)
from serversync.core.model import (
    ApprovalStatus,
    Channel,
    ChannelState,
    CredentialSource,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
)
from serversync.core.rules import login_for
from serversync.core.secret import Secret
from serversync.services import connect_options
from serversync.services.act import ActService
from serversync.store.db import Database
from tests.fakes.graph_server import GraphServer
from tests.fakes.loopback import Recorded

APP, SECRET, BOB = "app-act", "act~secret", "bob@contoso.test"
START = (dt.datetime.now(dt.UTC) + dt.timedelta(days=20)).replace(hour=9, minute=0, second=0,
                                                                   microsecond=0)


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, SECRET)
    fake.add_user(BOB)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def profile(server: GraphServer) -> Profile:
    return Profile("eo", ServerKind.EXCHANGE_ONLINE, None, credential_source=CredentialSource.APP,
                   tenant_id=server.tenant, client_id=APP, client_secret=Secret(SECRET),
                   token_url=server.token_url, api_url=server.api_url, allow_plaintext=True)


async def make_service(db: Database, server: GraphServer) -> ActService:
    mailbox = Mailbox(BOB, PartyKind.USER, BOB, "eo",
                      act=ChannelState(SyncMethod.SERVER_SIDE, True),
                      approval=ApprovalStatus.APPROVED)
    async with db.transaction() as repo:
        await repo.save_profile(profile(server))
        await repo.save_mailbox(mailbox)
    return ActService(db, wiring.ACT_STORES)


def meeting(uid: str, **kw: object) -> Appointment:
    base = Appointment(uid=uid, subject="Planning", start=START,
                       end=START + dt.timedelta(hours=1), location="Room 1", organizer=BOB,
                       reminder_minutes=15, body="Agenda", owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def person(uid: str, **kw: object) -> Contact:
    base = Contact(uid=uid, full_name="Ann Lee", given_name="Ann", family_name="Lee",
                   organization="Acme", emails=("ann@acme.test",),
                   phones=(Phone("cell", "+49 170 1"),), owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def by_uid(server: GraphServer, collection: str) -> dict[str, dict[str, object]]:
    items = server.users[BOB].collection(collection).items.values()
    return {graph_items._uid(i): i for i in items}


async def test_both_directions_for_appointments_and_contacts(db: Database,
                                                             server: GraphServer) -> None:
    act = await make_service(db, server)
    await act.create(meeting("m-app"))
    await act.create(meeting("m-keep", subject="Review", start=START + dt.timedelta(days=1),
                             end=START + dt.timedelta(days=1, hours=1)))
    await act.create(person("c-app"))
    await act.create(person("c-keep", full_name="Kim Park", emails=("kim@acme.test",)))
    await act.create(Task(uid="t-app", subject="Send offer", due=START, priority=1, owner=BOB))
    await act.create(Task(uid="t-keep", subject="Call back", owner=BOB))
    summary = await act.sync(BOB)
    assert summary.items == 6 and summary.failures == 0, summary
    tasks = by_uid(server, "todo:tasks-default")
    assert {t["title"] for t in tasks.values()} == {"Send offer", "Call back"}
    assert tasks["t-app"]["importance"] == "high"
    assert tasks["t-app"]["extensions"][0]["extensionName"] == graph_items.EXTENSION
    events, contacts = by_uid(server, "events"), by_uid(server, "contacts")
    assert set(events) == {"m-app", "m-keep"} and set(contacts) == {"c-app", "c-keep"}
    assert events["m-app"]["subject"] == "Planning"
    assert events["m-app"]["start"] == {"dateTime": START.strftime("%Y-%m-%dT%H:%M:%S"),
                                        "timeZone": "UTC"}
    posts = [json.loads(r.body) for r in server.requests
             if r.method == "POST" and r.path.endswith("/events")]
    assert sorted(p["singleValueExtendedProperties"][0]["value"] for p in posts) == [
        "m-app", "m-keep"]
    assert all(p["singleValueExtendedProperties"][0]["id"] == graph_items.UID_PROPERTY
               for p in posts)

    assert (await act.sync(BOB)).items == 0  # nothing changed on either side

    # server -> application: a change made in Outlook, and a contact created there
    server.put(BOB, "events", {"subject": "Moved in Outlook"}, str(events["m-app"]["id"]))
    made = server.put(BOB, "contacts", {"displayName": "Bo Outlook", "givenName": "Bo",
                                        "emailAddresses": [{"address": "bo@x.test"}]})
    assert (await act.sync(BOB)).items == 2
    moved = await act.get(ItemKind.APPOINTMENT, "m-app")
    assert moved.subject == "Moved in Outlook"  # type: ignore[union-attr]
    imported = await act.get(ItemKind.CONTACT, str(made["id"]))
    assert isinstance(imported, Contact) and imported.full_name == "Bo Outlook"
    assert imported.owner == BOB

    # application -> server: change and delete
    await act.change(person("c-app", job_title="CTO"))
    await act.delete(ItemKind.APPOINTMENT, "m-app")
    await act.change(Task(uid="t-app", subject="Send offer", due=START, priority=1, owner=BOB,
                          status=TaskStatus.COMPLETED, percent_complete=100))
    assert (await act.sync(BOB)).items == 3
    assert by_uid(server, "todo:tasks-default")["t-app"]["status"] == "completed"
    assert "m-app" not in by_uid(server, "events")
    assert by_uid(server, "contacts")["c-app"]["jobTitle"] == "CTO"
    patches = [r for r in server.requests if r.method == "PATCH"]
    assert patches and all(r.headers.get("if-match", "").startswith('W/"') for r in patches)

    # server -> application: delete
    server.remove(BOB, "contacts", str(by_uid(server, "contacts")["c-app"]["id"]))
    assert (await act.sync(BOB)).items == 1
    assert await act.find(ItemKind.CONTACT, "c-app") is None


async def test_a_stale_etag_is_refused(server: GraphServer) -> None:
    prof = profile(server)
    box = Mailbox(BOB, PartyKind.USER, BOB, "eo")
    login = login_for(prof, box, Channel.ACT)
    async with graph_items.store(prof, login, connect_options(prof)) as store:
        [collection] = (await store.collections([ItemKind.CONTACT])).values()
        written = await store.put(collection, person("c1"), href=None, if_match=None,
                                  invitations=False)
        assert written.hash == content_hash(dataclasses.replace(person("c1"), owner=""))
        server.put(BOB, "contacts", {"jobTitle": "changed elsewhere"},
                   written.href.rsplit("/", 1)[1])
        with pytest.raises(PreconditionFailed):
            await store.put(collection, person("c1", job_title="ours"), href=written.href,
                            if_match=written.etag, invitations=False)
        changes = await store.changes(collection, None)
        assert changes.complete and [h for h, _ in changes.changed] == [written.href]
        [fetched] = await store.get_many(collection, [written.href])
        assert fetched.record is not None and fetched.record.uid == "c1"


# ---------------------------------------------------------------- recurring series

BERLIN = ZoneInfo("Europe/Berlin")
W_EUROPE = "W. Europe Standard Time"


def _dst_monday() -> dt.datetime:
    """09:00 Berlin on the Monday two weeks before next year's spring change of daylight
    saving (last Sunday of March), so that a six-week series crosses it."""
    year = dt.date.today().year + 1
    change = max(dt.date(year, 3, d) for d in range(25, 32) if dt.date(year, 3, d).weekday() == 6)
    monday = change - dt.timedelta(days=13)
    return dt.datetime.combine(monday, dt.time(9), BERLIN)


SERIES = _dst_monday()


def weekly(uid: str, **kw: object) -> Appointment:
    base = Appointment(uid=uid, subject="Weekly sync", start=SERIES,
                       end=SERIES + dt.timedelta(hours=1), timezone="Europe/Berlin",
                       rrule="FREQ=WEEKLY;COUNT=6", location="Room 1", organizer=BOB,
                       reminder_minutes=15, body="Agenda", owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def week(n: int, **delta: float) -> dt.datetime:
    """The n-th occurrence's wall-clock start (0-based), moved by ``delta``."""
    local = (SERIES.replace(tzinfo=None) + dt.timedelta(weeks=n)).replace(tzinfo=BERLIN)
    return local + dt.timedelta(**delta)


def stamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_text(moment: dt.datetime) -> str:
    return moment.astimezone(BERLIN).strftime("%Y-%m-%dT%H:%M:%S")


def writes(server: GraphServer, since: int = 0) -> list[tuple[str, str, Any]]:
    """(method, path without /v1.0/users/bob, JSON body) of every write since ``since``."""
    out = []
    for request in server.requests[since:]:
        if request.method in ("POST", "PATCH", "DELETE") and "/v1.0/" in request.path:
            path = request.path.split(f"/users/{BOB}", 1)[-1]
            out.append((request.method, path, json.loads(request.body) if request.body
                        else None))
    return out


def instances_query(request: Recorded) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(request.path.partition("?")[2]))


def series_ids(server: GraphServer) -> list[str]:
    return [str(i["id"]) for i in server.users[BOB].collection("events").items.values()]


async def test_weekly_series_with_a_cancelled_and_a_moved_occurrence_both_ways(
        db: Database, server: GraphServer) -> None:
    act = await make_service(db, server)
    moved = Occurrence(week(2), week(2, days=1, hours=1), week(2, days=1, hours=2),
                       "Weekly sync (moved)", "Room 2", "Agenda")
    await act.create(weekly("s-app", cancelled_occurrences=(week(1),), occurrences=(moved,)))
    assert (await act.sync(BOB)).items == 1
    [master_id] = series_ids(server)
    sent = writes(server)
    assert sent[0] == ("POST", "/events", {
        "subject": "Weekly sync", "body": {"contentType": "text", "content": "Agenda"},
        "start": {"dateTime": local_text(SERIES), "timeZone": W_EUROPE},
        "end": {"dateTime": local_text(SERIES + dt.timedelta(hours=1)), "timeZone": W_EUROPE},
        "isAllDay": False, "location": {"displayName": "Room 1"}, "showAs": "busy",
        "isReminderOn": True, "reminderMinutesBeforeStart": 15,
        "singleValueExtendedProperties": [{"id": graph_items.UID_PROPERTY, "value": "s-app"}],
        "recurrence": {
            "pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"],
                        "firstDayOfWeek": "monday"},
            "range": {"type": "numbered", "startDate": SERIES.date().isoformat(),
                      "numberOfOccurrences": 6, "recurrenceTimeZone": W_EUROPE}}})
    occurrence = f"/events/{master_id}_OCC_"
    assert sent[1:] == [
        ("DELETE", occurrence + week(1).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ"), None),
        ("PATCH", occurrence + week(2).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ"), {
            "subject": "Weekly sync (moved)", "location": {"displayName": "Room 2"},
            "start": {"dateTime": local_text(week(2, days=1, hours=1)), "timeZone": W_EUROPE},
            "end": {"dateTime": local_text(week(2, days=1, hours=2)), "timeZone": W_EUROPE}})]
    posted = next(r for r in server.requests if r.method == "POST" and "/events" in r.path)
    assert posted.headers["prefer"] == 'outlook.timezone="UTC"'
    # each occurrence was found by its original start in a narrow window of /instances
    narrow = [instances_query(r) for r in server.requests
              if "/instances" in r.path and "id,type,originalStart" in urllib.parse.unquote(
                  r.path)]
    assert narrow[0] == {"startDateTime": stamp(week(1) - dt.timedelta(days=1)),
                         "endDateTime": stamp(week(1, days=1, hours=1)),
                         "$select": "id,type,originalStart", "$top": "100"}
    assert server.calendar.cancelled(BOB, master_id) == [stamp(week(1))]
    # wall-clock 09:00 in Berlin on both sides of the change of daylight saving
    listed = server.calendar.listed(BOB, master_id, SERIES - dt.timedelta(days=1),
                                    SERIES + dt.timedelta(weeks=7))
    plain = [i for i in listed if i["type"] == "occurrence"]
    assert len(listed) == 5 and len(plain) == 4
    assert {dt.datetime.fromisoformat(i["start"]["dateTime"][:19]).replace(
        tzinfo=dt.UTC).astimezone(BERLIN).time() for i in plain} == {dt.time(9)}
    assert {i["start"]["dateTime"][11:13] for i in plain} == {"08", "07"}

    before = len(server.requests)
    assert (await act.sync(BOB)).items == 0  # read back equal: no loop
    assert writes(server, before) == []

    # server -> application: in Outlook, one more occurrence cancelled, another renamed
    server.calendar.cancel(BOB, master_id, week(4))
    server.calendar.change(BOB, master_id, week(3), {"subject": "Weekly sync (guests)"})
    assert (await act.sync(BOB)).items == 1
    record = await act.get(ItemKind.APPOINTMENT, "s-app")
    assert isinstance(record, Appointment)
    assert record.rrule == "FREQ=WEEKLY;BYDAY=MO;COUNT=6"
    assert record.timezone == "Europe/Berlin"
    assert sorted(record.cancelled_occurrences) == [week(1), week(4)]
    assert sorted(record.occurrences, key=lambda o: o.recurrence_id) == [
        moved, Occurrence(week(3), week(3), week(3, hours=1), "Weekly sync (guests)",
                          "Room 1", "Agenda")]
    assert (await act.sync(BOB)).items == 0


def outlook_series(server: GraphServer, subject: str, pattern: dict[str, Any],
                   start: dt.datetime, hours: float = 1, span: dict[str, Any] | None = None,
                   zone: str = "Pacific Standard Time") -> str:
    """A series as Outlook creates it (every field filled in, as Graph returns them)."""
    local = start.strftime("%Y-%m-%dT%H:%M:%S.0000000")
    end = (start + dt.timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.0000000")
    made = server.put(BOB, "events", {
        "subject": subject, "type": "seriesMaster", "isAllDay": False,
        "originalStartTimeZone": zone, "originalEndTimeZone": zone,
        "start": {"dateTime": local, "timeZone": zone}, "end": {"dateTime": end, "timeZone": zone},
        "location": {"displayName": ""}, "body": {"contentType": "html", "content": ""},
        "recurrence": {
            "pattern": {"type": "weekly", "interval": 1, "month": 0, "dayOfMonth": 0,
                        "daysOfWeek": [], "firstDayOfWeek": "sunday", "index": "first",
                        **pattern},
            "range": span or {"type": "noEnd", "startDate": start.date().isoformat(),
                              "endDate": "0001-01-01", "recurrenceTimeZone": zone,
                              "numberOfOccurrences": 0}}})
    return str(made["id"])


async def test_a_series_made_in_outlook_syncs_and_only_what_changed_is_written(
        db: Database, server: GraphServer) -> None:
    act = await make_service(db, server)
    la = ZoneInfo("America/Los_Angeles")
    first = (dt.datetime.now(la) + dt.timedelta(days=10)).replace(hour=12, minute=0, second=0,
                                                                  microsecond=0, tzinfo=None)
    first += dt.timedelta(days=(7 - first.weekday()) % 7)  # a Monday
    at = [(first + dt.timedelta(days=d)).replace(tzinfo=la) for d in (0, 2, 7, 9, 14, 16)]
    span = {"type": "endDate", "startDate": first.date().isoformat(),
            "endDate": (first.date() + dt.timedelta(days=16)).isoformat(),
            "recurrenceTimeZone": "Pacific Standard Time", "numberOfOccurrences": 0}
    master_id = outlook_series(server, "Lunch", {"daysOfWeek": ["monday", "wednesday"]},
                               first, span=span)
    server.calendar.cancel(BOB, master_id, at[1])
    server.calendar.change(BOB, master_id, at[2], {
        "start": {"dateTime": (first + dt.timedelta(days=8)).strftime("%Y-%m-%dT%H:%M:%S"),
                  "timeZone": "Pacific Standard Time"},
        "end": {"dateTime": (first + dt.timedelta(days=8, hours=1)).strftime(
            "%Y-%m-%dT%H:%M:%S"), "timeZone": "Pacific Standard Time"}})
    assert (await act.sync(BOB)).items == 1
    record = await act.get(ItemKind.APPOINTMENT, master_id)  # made in Outlook: UID is its id
    assert isinstance(record, Appointment) and record.owner == BOB
    assert record.timezone == "America/Los_Angeles"
    until = (first + dt.timedelta(days=16)).replace(tzinfo=la).astimezone(dt.UTC)
    assert record.rrule == f"FREQ=WEEKLY;BYDAY=MO,WE;WKST=SU;UNTIL={until:%Y%m%dT%H%M%SZ}"
    assert record.cancelled_occurrences == (at[1],)
    tuesday = at[2] + dt.timedelta(days=1)
    assert record.occurrences == (Occurrence(at[2], tuesday, tuesday + dt.timedelta(hours=1),
                                             "Lunch"),)
    assert (await act.sync(BOB)).items == 0

    # the application renames the series: one PATCH of the master with just the subject.
    # The moved occurrence's record still says "Lunch" (an iCalendar override keeps its own
    # SUMMARY), while Exchange lets an exception follow the master's subject: so it is pinned
    stamp2 = at[2].astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    before = len(server.requests)
    await act.change(dataclasses.replace(record, subject="Team lunch", owner=BOB))
    assert (await act.sync(BOB)).items == 1
    assert writes(server, before) == [
        ("PATCH", f"/events/{master_id}", {"subject": "Team lunch"}),
        ("PATCH", f"/events/{master_id}_OCC_{stamp2}", {"subject": "Lunch"})]
    patch = next(r for r in server.requests[before:] if r.method == "PATCH")
    assert patch.headers["if-match"].startswith('W/"')
    assert (await act.sync(BOB)).items == 0

    # the application cancels one more: one DELETE of that occurrence (its id already read)
    before = len(server.requests)
    record = await act.get(ItemKind.APPOINTMENT, master_id)
    assert isinstance(record, Appointment)
    await act.change(dataclasses.replace(record, cancelled_occurrences=(at[1], at[4])))
    assert (await act.sync(BOB)).items == 1
    stamp4 = at[4].astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    assert writes(server, before) == [("DELETE", f"/events/{master_id}_OCC_{stamp4}", None)]
    assert not [r for r in server.requests[before:] if "originalStart" in
                urllib.parse.unquote(r.path) and "id,type,originalStart&" in
                urllib.parse.unquote(r.path)]
    assert (await act.sync(BOB)).items == 0

    # restoring a cancelled occurrence: Graph cannot, so the series (no attendees) is
    # created anew with exactly the application's occurrences
    before = len(server.requests)
    record = await act.get(ItemKind.APPOINTMENT, master_id)
    assert isinstance(record, Appointment)
    await act.change(dataclasses.replace(record, cancelled_occurrences=(at[4],)))
    assert (await act.sync(BOB)).items == 1
    done = writes(server, before)
    assert done[0] == ("DELETE", f"/events/{master_id}", None)
    assert done[1][0:2] == ("POST", "/events") and done[1][2]["subject"] == "Team lunch"
    [new_id] = series_ids(server)
    assert server.calendar.cancelled(BOB, new_id) == [stamp(at[4])]
    assert list(server.calendar.exceptions(BOB, new_id)) == [stamp(at[2])]
    assert (await act.sync(BOB)).items == 0
    again = await act.get(ItemKind.APPOINTMENT, master_id)
    assert isinstance(again, Appointment) and again.cancelled_occurrences == (at[4],)


def _last_fridays(start: dt.date, count: int) -> list[dt.date]:
    out, year, month = [], start.year, start.month
    while len(out) < count:
        last = dt.date(year, month, calendar.monthrange(year, month)[1])
        friday = last - dt.timedelta(days=(last.weekday() - 4) % 7)
        if friday >= start:
            out.append(friday)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


async def test_last_friday_of_the_month_both_ways(db: Database, server: GraphServer) -> None:
    act = await make_service(db, server)
    fridays = _last_fridays(dt.date.today() + dt.timedelta(days=7), 4)
    start = dt.datetime.combine(fridays[0], dt.time(15), BERLIN)
    await act.create(weekly("retro", subject="Retro", start=start,
                            end=start + dt.timedelta(hours=1), rrule="FREQ=MONTHLY;BYDAY=-1FR",
                            location="", reminder_minutes=None))
    assert (await act.sync(BOB)).items == 1
    [(_, _, body)] = writes(server)
    assert body["recurrence"] == {
        "pattern": {"type": "relativeMonthly", "interval": 1, "daysOfWeek": ["friday"],
                    "index": "last"},
        "range": {"type": "noEnd", "startDate": fridays[0].isoformat(),
                  "recurrenceTimeZone": W_EUROPE}}
    [master_id] = series_ids(server)
    listed = server.calendar.listed(BOB, master_id, start - dt.timedelta(days=1),
                                    dt.datetime.combine(fridays[3], dt.time(23), BERLIN))
    assert [dt.datetime.fromisoformat(i["start"]["dateTime"][:19]).replace(tzinfo=dt.UTC)
            .astimezone(BERLIN) for i in listed] == [
        dt.datetime.combine(f, dt.time(15), BERLIN) for f in fridays]
    assert (await act.sync(BOB)).items == 0
    record = await act.get(ItemKind.APPOINTMENT, "retro")
    assert isinstance(record, Appointment) and record.rrule == "FREQ=MONTHLY;BYDAY=-1FR"

    # made in Outlook (Pacific time, ending after three): the same rule comes back
    pacific = ZoneInfo("America/Los_Angeles")
    first = dt.datetime.combine(fridays[1], dt.time(9))
    outlook_id = outlook_series(server, "Demo", {
        "type": "relativeMonthly", "daysOfWeek": ["friday"], "index": "last"}, first, span={
        "type": "numbered", "startDate": fridays[1].isoformat(), "endDate": "0001-01-01",
        "recurrenceTimeZone": "Pacific Standard Time", "numberOfOccurrences": 3})
    assert (await act.sync(BOB)).items == 1
    demo = await act.get(ItemKind.APPOINTMENT, outlook_id)
    assert isinstance(demo, Appointment)
    assert (demo.rrule, demo.timezone, demo.start) == (
        "FREQ=MONTHLY;BYDAY=-1FR;COUNT=3", "America/Los_Angeles", first.replace(tzinfo=pacific))
    assert demo.cancelled_occurrences == () and demo.occurrences == ()


async def test_an_unrepresentable_rule_is_refused_naming_it_while_others_sync(
        db: Database, server: GraphServer) -> None:
    act = await make_service(db, server)
    await act.create(weekly("twice-a-month", rrule="FREQ=MONTHLY;BYMONTHDAY=1,15"))
    await act.create(meeting("plain"))
    server.put(BOB, "events", {
        "subject": "Custom zone", "type": "seriesMaster",
        "originalStartTimeZone": "tzone://Microsoft/Custom",
        "start": {"dateTime": "2026-03-02T09:00:00.0000000", "timeZone": "UTC"},
        "end": {"dateTime": "2026-03-02T10:00:00.0000000", "timeZone": "UTC"},
        "recurrence": {"pattern": {"type": "daily", "interval": 1},
                       "range": {"type": "numbered", "startDate": "2026-03-02",
                                 "recurrenceTimeZone": "tzone://Microsoft/Custom",
                                 "numberOfOccurrences": 3}}})
    summary = await act.sync(BOB)
    assert summary.items == 1 and summary.failures == 2, summary
    assert "twice-a-month" in summary.detail
    assert "FREQ=MONTHLY;BYMONTHDAY=1,15" in summary.detail
    assert [b["subject"] for m, p, b in writes(server) if m == "POST"] == ["Planning"]
    async with db.transaction() as repo:
        alerts = await repo.list_alerts(mailbox=BOB)
    [bad] = [a for a in alerts if a.code == "act-bad-item"]
    assert "tzone://Microsoft/Custom" in bad.message
    assert await act.quarantine_count(BOB) == 1
    # the application record Exchange cannot take: one alert naming it and the rule, with
    # what to change; not repeated while it is open
    [refused] = [a for a in alerts if a.code == "act-item-refused"]
    assert "twice-a-month" in refused.message and "BYMONTHDAY=1,15" in refused.message
    assert refused.fix and "Outlook" in refused.fix
    await act.sync(BOB)
    async with db.transaction() as repo:
        again = [a for a in await repo.list_alerts(mailbox=BOB) if a.code == "act-item-refused"]
    assert len(again) == 1


async def test_a_recurring_to_do_task_both_ways(db: Database, server: GraphServer) -> None:
    act = await make_service(db, server)
    friday = dt.date.today() + dt.timedelta(days=(4 - dt.date.today().weekday()) % 7 + 7)
    due = dt.datetime.combine(friday, dt.time(), dt.UTC)
    await act.create(Task(uid="t-rec", subject="Timesheet", due=due, owner=BOB,
                          rrule="FREQ=WEEKLY;BYDAY=FR"))
    await act.create(Task(uid="t-nodue", subject="Someday", owner=BOB, rrule="FREQ=DAILY"))
    summary = await act.sync(BOB)
    assert summary.items == 1 and summary.failures == 1, summary
    assert "To Do repeats a task from its due date" in summary.detail
    posts = [b for m, p, b in writes(server) if m == "POST" and p.endswith("/tasks")]
    assert [p["title"] for p in posts] == ["Timesheet"]
    assert posts[0]["dueDateTime"] == {"dateTime": f"{friday.isoformat()}T00:00:00",
                                       "timeZone": "UTC"}
    assert posts[0]["recurrence"] == {
        "pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["friday"],
                    "firstDayOfWeek": "monday"},
        "range": {"type": "noEnd", "startDate": friday.isoformat(), "recurrenceTimeZone": "UTC"}}
    assert (await act.sync(BOB)).failures == 1  # the refused one is retried, the other quiet

    # made in To Do: every second Tuesday
    tuesday = friday + dt.timedelta(days=4)
    made = server.put(BOB, "todo:tasks-default", {
        "title": "Backups", "status": "notStarted", "importance": "normal",
        "dueDateTime": {"dateTime": f"{tuesday.isoformat()}T00:00:00.0000000", "timeZone": "UTC"},
        "recurrence": {"pattern": {"type": "weekly", "interval": 2, "month": 0, "dayOfMonth": 0,
                                   "daysOfWeek": ["tuesday"], "firstDayOfWeek": "sunday",
                                   "index": "first"},
                       "range": {"type": "noEnd", "startDate": tuesday.isoformat(),
                                 "endDate": "0001-01-01", "recurrenceTimeZone": "UTC",
                                 "numberOfOccurrences": 0}}})
    assert (await act.sync(BOB)).items == 1
    backups = await act.get(ItemKind.TASK, str(made["id"]))
    assert isinstance(backups, Task)
    assert backups.rrule == "FREQ=WEEKLY;INTERVAL=2;BYDAY=TU;WKST=SU"
    assert backups.due == dt.datetime.combine(tuesday, dt.time(), dt.UTC)

    # the application stops the repeat: the PATCH says so
    before = len(server.requests)
    await act.change(dataclasses.replace(backups, rrule="", owner=BOB))
    await act.delete(ItemKind.TASK, "t-nodue")  # never reached To Do: nothing to delete
    summary = await act.sync(BOB)
    assert (summary.items, summary.failures) == (1, 0), summary
    [(_, _, body)] = [w for w in writes(server, before) if w[0] == "PATCH"]
    assert body["recurrence"] is None
    stored = server.users[BOB].collection("todo:tasks-default").items[str(made["id"])]
    assert stored["recurrence"] is None
    assert (await act.sync(BOB)).items == 0


async def test_a_written_series_reads_back_with_the_same_hash(server: GraphServer) -> None:
    prof = profile(server)
    box = Mailbox(BOB, PartyKind.USER, BOB, "eo")
    login = login_for(prof, box, Channel.ACT)
    series = weekly("s1", owner="", rrule="FREQ=WEEKLY;BYDAY=MO,TH;UNTIL=20991231T000000Z",
                    cancelled_occurrences=(week(1),), occurrences=(Occurrence(
                        week(2), week(2, hours=2), week(2, hours=3), "later"),))
    async with graph_items.store(prof, login, connect_options(prof)) as store:
        [collection] = (await store.collections([ItemKind.APPOINTMENT])).values()
        written = await store.put(collection, series, href=None, if_match=None,
                                  invitations=False)
        single = await store.put(collection, meeting("one", owner=""), href=None,
                                 if_match=None, invitations=False)
        day = SERIES.date()
        all_day = await store.put(collection, weekly(
            "a1", owner="", start=day, end=day + dt.timedelta(days=1), all_day=True,
            rrule="FREQ=YEARLY;COUNT=3", cancelled_occurrences=(day.replace(year=day.year + 1),),
        ), href=None, if_match=None, invitations=False)
        changes = await store.changes(collection, None)
        hrefs = [written.href, single.href, all_day.href]
        assert sorted(h for h, _ in changes.changed) == sorted(hrefs)  # no occurrences
        fetched = {f.href: f for f in await store.get_many(collection, hrefs)}
    birthday = fetched[all_day.href].record
    assert isinstance(birthday, Appointment)
    assert (birthday.start, birthday.rrule, birthday.cancelled_occurrences) == (
        day, f"FREQ=YEARLY;BYMONTHDAY={day.day};BYMONTH={day.month};COUNT=3",
        (day.replace(year=day.year + 1),))
    for item in (written, single, all_day):
        record = fetched[item.href].record
        assert record is not None, fetched[item.href].problem
        assert content_hash(record) == item.hash
        assert fetched[item.href].etag == item.etag
    record = fetched[written.href].record
    assert isinstance(record, Appointment)
    # an endless-looking rule (UNTIL 2099) is read up to the horizon; what we wrote is there
    # (UNTIL 00:00 UTC on the 31st is before 09:00 Berlin: the 30th is the last day)
    assert record.rrule == "FREQ=WEEKLY;BYDAY=MO,TH;UNTIL=20991230T080000Z"
    assert record.cancelled_occurrences == (week(1),)
    assert [o.subject for o in record.occurrences] == ["later"]
