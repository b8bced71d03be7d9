"""iCalendar / vCard mapping: round trips keep the content hash, bad input is an ItemError,
and the reference's outgoing rules (`core.act.for_server`, `sends_invitations`)."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from serversync.connectors import ical
from serversync.core.act import (
    ActFilter,
    Appointment,
    AppointmentScope,
    AppointmentStatus,
    Attendee,
    AttendeeRole,
    BusyStatus,
    Contact,
    Occurrence,
    Phone,
    PostalAddress,
    Response,
    Task,
    TaskScope,
    TaskStatus,
    content_hash,
    for_server,
    in_filter,
    is_past,
    sends_invitations,
)
from serversync.core.errors import ItemError

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
START = dt.datetime(2026, 7, 6, 9, tzinfo=BERLIN)


def appointment(**kw: object) -> Appointment:
    base: dict[str, object] = dict(
        uid="a1", subject="Plänung", start=START, end=START + dt.timedelta(hours=1),
        timezone="Europe/Berlin", location="Room 1", organizer="alice@example.test",
        attendees=(Attendee("bob@example.test", "Bob", AttendeeRole.REQUIRED, Response.ACCEPTED),
                   Attendee("room@example.test", "Room", AttendeeRole.RESOURCE)),
        rrule="FREQ=WEEKLY;COUNT=10", cancelled_occurrences=(START + dt.timedelta(days=7),),
        occurrences=(Occurrence(START + dt.timedelta(days=14), START + dt.timedelta(days=15),
                                START + dt.timedelta(days=15, hours=1), "moved"),),
        reminder_minutes=15, busy=BusyStatus.OUT_OF_OFFICE, body="line 1\nline 2")
    base.update(kw)
    return Appointment(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("record", [
    appointment(),
    appointment(status=AppointmentStatus.COMPLETED, busy=BusyStatus.FREE),
    appointment(uid="allday", start=dt.date(2026, 7, 1), end=dt.date(2026, 7, 2), all_day=True,
                rrule="", cancelled_occurrences=(), occurrences=(), timezone="UTC"),
    Task(uid="t1", subject="Do it", due=dt.datetime(2026, 7, 1, 17, tzinfo=dt.UTC),
         start=dt.date(2026, 6, 20), status=TaskStatus.IN_PROGRESS, percent_complete=40,
         priority=2, body="b"),
    Task(uid="t2", subject="Done", status=TaskStatus.COMPLETED, percent_complete=100,
         completed_at=dt.datetime(2026, 6, 2, 8, tzinfo=dt.UTC)),
    Task(uid="t3", subject="Weekly report", due=dt.date(2026, 7, 3), rrule="FREQ=WEEKLY;BYDAY=FR"),
    Contact(uid="c1", full_name="Ann Lee", given_name="Ann", family_name="Lee", prefix="Dr.",
            organization="Acme", job_title="CTO", emails=("ann@acme.test", "a@home.test"),
            phones=(Phone("cell", "+49 170 1"), Phone("work", "+49 30 2")),
            addresses=(PostalAddress("work", "Hauptstraße 1", "Köln", "NRW", "50667", "DE"),),
            birthday=dt.date(1980, 2, 29), notes="likes ; and , too"),
], ids=lambda r: r.uid)
def test_round_trip_keeps_the_content_hash(record: Appointment | Task | Contact) -> None:
    back = ical.parse(ical.render(record), vcard=isinstance(record, Contact))
    assert content_hash(back) == content_hash(record)


def test_a_recurring_task_keeps_its_rule_and_one_off_tasks_keep_their_hash() -> None:
    raw = ical.render(Task(uid="t3", subject="Report", due=dt.date(2026, 7, 3),
                           rrule="FREQ=WEEKLY;BYDAY=FR"))
    assert b"RRULE:FREQ=WEEKLY;BYDAY=FR" in raw
    back = ical.parse(raw, vcard=False)
    assert isinstance(back, Task) and back.rrule == "FREQ=WEEKLY;BYDAY=FR"
    # the hash of a one-off task has no rrule in it: rows stored before recurring tasks
    # existed are not seen as changed
    assert content_hash(Task(uid="t", subject="s")) == (
        "7347b29431f8fbece37e005ecda761a22b4eb8d2691ce811a2137e2f1f7e1c65")  # before 0011


def test_vcard_4_is_read() -> None:
    raw = (b"BEGIN:VCARD\r\nVERSION:4.0\r\nUID:urn:uuid:1\r\nFN:Zoe\r\nN:Q;Zoe;;;\r\n"
           b"EMAIL;TYPE=work:zoe@x.test\r\nTEL;VALUE=uri;TYPE=cell:tel:+1-555\r\n"
           b"BDAY:19900102\r\nEND:VCARD\r\n")
    contact = ical.parse_vcard(raw)
    assert (contact.full_name, contact.emails, contact.phones[0], contact.birthday) == (
        "Zoe", ("zoe@x.test",), Phone("cell", "+1-555"), dt.date(1990, 1, 2))


EVENT = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\n{body}END:VCALENDAR\r\n")


@pytest.mark.parametrize(("body", "reason"), [
    ("BEGIN:VEVENT\r\nDTSTART:20260105T090000Z\r\nEND:VEVENT\r\n", "no UID"),
    ("BEGIN:VEVENT\r\nUID:x\r\nDTSTART:20261399T250000\r\nEND:VEVENT\r\n", "DTSTART"),
    ("BEGIN:VEVENT\r\nUID:x\r\nDTSTART;TZID=Mars/Olympus:20260105T090000\r\nEND:VEVENT\r\n",
     "unknown time zone"),
    ("BEGIN:VEVENT\r\nUID:x\r\nDTSTART:20260105T090000Z\r\nEND:VEVENT\r\n"
     "BEGIN:VEVENT\r\nUID:y\r\nDTSTART:20260105T090000Z\r\nEND:VEVENT\r\n", "several UIDs"),
    ("BEGIN:VEVENT\r\nUID:x\r\nSUMMARY:no start\r\nEND:VEVENT\r\n", "no DTSTART"),
    ("BEGIN:VJOURNAL\r\nUID:x\r\nEND:VJOURNAL\r\n", "no VEVENT or VTODO"),
])
def test_bad_icalendar_is_an_item_error(body: str, reason: str) -> None:
    with pytest.raises(ItemError, match=reason):
        ical.parse_calendar(EVENT.format(body=body).encode())


@pytest.mark.parametrize("raw", [
    b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:No Uid\r\nEND:VCARD\r\n",
    b"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:x\r\nFN:X\r\nBDAY:yesterday\r\nEND:VCARD\r\n",
    b"not a card at all",
])
def test_bad_vcard_is_an_item_error(raw: bytes) -> None:
    with pytest.raises(ItemError):
        ical.parse_vcard(raw)


def test_completed_or_cancelled_appointments_go_out_free_without_reminder() -> None:
    for status in (AppointmentStatus.COMPLETED, AppointmentStatus.CANCELLED):
        out = for_server(appointment(status=status), NOW)
        assert isinstance(out, Appointment)
        assert out.busy is BusyStatus.FREE and out.reminder_minutes is None
    assert for_server(appointment(), NOW) == appointment()
    stale = appointment(start=NOW - dt.timedelta(days=8), end=NOW - dt.timedelta(days=8),
                        rrule="", cancelled_occurrences=(), occurrences=())
    assert for_server(stale, NOW).reminder_minutes is None  # type: ignore[union-attr]


def test_invitations_only_for_future_appointments_the_user_organises() -> None:
    assert sends_invitations(appointment(), "alice@example.test", NOW)
    assert not sends_invitations(appointment(), "bob@example.test", NOW)
    assert not sends_invitations(appointment(attendees=()), "alice@example.test", NOW)
    past = appointment(start=NOW - dt.timedelta(days=1), end=NOW - dt.timedelta(hours=23))
    assert not sends_invitations(past, "alice@example.test", NOW)
    raw = ical.render(appointment(), invitations=False).decode().replace("\r\n ", "")
    assert raw.count("SCHEDULE-AGENT=CLIENT") == 2
    assert "SCHEDULE-AGENT" not in ical.render(appointment(), invitations=True).decode()


def test_past_series() -> None:
    single = appointment(rrule="", start=NOW - dt.timedelta(days=2), end=NOW - dt.timedelta(days=1))
    assert is_past(single, NOW)
    assert not is_past(appointment(rrule="FREQ=DAILY"), NOW)  # never ends
    assert is_past(appointment(start=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                               end=dt.datetime(2025, 1, 1, 1, tzinfo=dt.UTC),
                               rrule="FREQ=DAILY;UNTIL=20250201T000000Z"), NOW)
    assert not is_past(appointment(rrule="FREQ=WEEKLY;COUNT=10"), NOW)


def test_sync_filters() -> None:
    mine = appointment(owner="alice@example.test")
    assert in_filter(mine, "bob@example.test", ActFilter())  # attends
    assert not in_filter(mine, "bob@example.test",
                         ActFilter(appointments=AppointmentScope.ORGANISED))
    task = Task(uid="t", subject="x", owner="alice@example.test")
    done = Task(uid="t", subject="x", owner="alice@example.test", status=TaskStatus.COMPLETED)
    assert in_filter(done, "alice@example.test", ActFilter())
    assert not in_filter(done, "alice@example.test", ActFilter(tasks=TaskScope.OPEN))
    assert in_filter(task, "alice@example.test", ActFilter(tasks=TaskScope.OPEN))
    assert not in_filter(Contact(uid="c", full_name="x", owner="bob@example.test"),
                         "alice@example.test", ActFilter())
