"""Recurring events and tasks in Microsoft Graph's documented shapes (`connectors.graph_items`,
`connectors.graph_recurrence`), without a server.

The fixtures (``tests/fixtures/graph/event-series-*.json``, ``todo-task-recurring.json``) are
written after the Microsoft pages they name: the docs' recurring lunch (every Monday 12:00 in
Pacific time, September to December 2017, across the November change of daylight saving)
with one occurrence moved and one cancelled.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from serversync.connectors import graph_items
from serversync.connectors.graph_recurrence import (
    HORIZON,
    PAD,
    Series,
    check_occurrences,
    iana_zone,
    pattern_of,
    recurrence_json,
    series_of,
    window,
    windows_zone,
)
from serversync.core.act import Appointment, Occurrence, Task
from serversync.core.errors import ItemError
from serversync.core.recurrence import Pattern, PatternType, Unrepresentable, WeekIndex

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graph"
LA = ZoneInfo("America/Los_Angeles")
BERLIN = ZoneInfo("Europe/Berlin")
NOW = dt.datetime(2017, 8, 1, tzinfo=dt.UTC)


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    assert data["source"].startswith("https://learn.microsoft.com/")
    return data


def lunch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    master = fixture("event-series-create.json")["body"]
    return master, fixture("event-series-instances.json")["body"]["value"]


def test_the_documented_series_becomes_one_exact_record() -> None:
    master, instances = lunch()
    series, _, _ = series_of(master, graph_items.event_zone(master))
    win = window(series, NOW)
    assert win.known_until is None and len(win.keys) == 17  # read whole: it ends in 2017
    record = graph_items.event_record(master, instances, win)
    assert record.timezone == "America/Los_Angeles"
    assert record.rrule == "FREQ=WEEKLY;BYDAY=MO;WKST=SU;UNTIL=20171231T200000Z"
    assert record.start == dt.datetime(2017, 9, 4, 12, tzinfo=LA)
    assert record.end == dt.datetime(2017, 9, 4, 14, tzinfo=LA)
    assert record.cancelled_occurrences == (dt.datetime(2017, 10, 9, 12, tzinfo=LA),)
    assert record.occurrences == (Occurrence(
        dt.datetime(2017, 10, 2, 12, tzinfo=LA), dt.datetime(2017, 10, 3, 13, tzinfo=LA),
        dt.datetime(2017, 10, 3, 14, 30, tzinfo=LA), "Lunch moved to Tuesday",
        "Harry's Bar", master["body"]["content"]),)
    # after daylight saving ends (5 Nov) the occurrences are still at noon: 20:00 UTC
    december = next(i for i in instances if i["originalStart"].startswith("2017-12-04"))
    assert december["originalStart"] == "2017-12-04T20:00:00Z"


def test_an_instance_the_pattern_does_not_produce_refuses_the_series() -> None:
    master, instances = lunch()
    series, _, _ = series_of(master, graph_items.event_zone(master))
    shifted = [{**i, "originalStart": "2017-09-05T19:00:00Z"} if n == 3 else i
               for n, i in enumerate(instances)]
    with pytest.raises(ItemError, match="does not produce") as caught:
        graph_items.event_record(master, shifted, window(series, NOW))
    assert "FREQ=WEEKLY;BYDAY=MO;WKST=SU" in caught.value.message


def test_an_exception_saying_what_the_series_says_is_no_change() -> None:
    master, instances = lunch()
    series, _, _ = series_of(master, graph_items.event_zone(master))
    same = [{**i, "type": "exception"} for i in instances if i["type"] == "occurrence"]
    record = graph_items.event_record(master, same, window(series, NOW))
    assert record.occurrences == ()
    assert len(record.cancelled_occurrences) == 2  # the moved one is missing from the list


def test_a_custom_outlook_zone_refuses_a_series_but_not_a_single_event() -> None:
    master, _ = lunch()
    custom = {**master, "originalStartTimeZone": "tzone://Microsoft/Custom",
              "recurrence": {**master["recurrence"], "range": {
                  **master["recurrence"]["range"], "recurrenceTimeZone": "tzone://Microsoft/Custom"}}}
    with pytest.raises(ItemError, match="tzone://Microsoft/Custom"):
        graph_items.event_zone(custom)
    single = {**custom, "recurrence": None, "type": "singleInstance",
              "start": {"dateTime": "2017-09-04T19:00:00.0000000", "timeZone": "UTC"},
              "end": {"dateTime": "2017-09-04T21:00:00.0000000", "timeZone": "UTC"}}
    record = graph_items.event_record(single)
    assert record.timezone == "UTC" and record.start == dt.datetime(2017, 9, 4, 19,
                                                                    tzinfo=dt.UTC)


def test_occurrences_are_never_records_of_their_own() -> None:
    _, instances = lunch()
    with pytest.raises(ItemError, match="series master"):
        graph_items.event_record(instances[0])


def test_all_day_events_keep_their_day_whatever_zone_they_are_read_in() -> None:
    event = {"id": "x", "subject": "Holiday", "isAllDay": True,
             "originalStartTimeZone": "W. Europe Standard Time",
             "start": {"dateTime": "2026-04-05T22:00:00.0000000", "timeZone": "UTC"},
             "end": {"dateTime": "2026-04-06T22:00:00.0000000", "timeZone": "UTC"}}
    record = graph_items.event_record(event)
    assert (record.start, record.end, record.timezone) == (
        dt.date(2026, 4, 6), dt.date(2026, 4, 7), "Europe/Berlin")


@pytest.mark.parametrize(("pattern", "json_pattern"), [
    (Pattern(PatternType.DAILY, dt.date(2026, 1, 5), interval=3),
     {"type": "daily", "interval": 3}),
    (Pattern(PatternType.WEEKLY, dt.date(2026, 1, 5), days_of_week=("monday", "friday"),
             first_day_of_week="sunday"),
     {"type": "weekly", "interval": 1, "daysOfWeek": ["monday", "friday"],
      "firstDayOfWeek": "sunday"}),
    (Pattern(PatternType.ABSOLUTE_MONTHLY, dt.date(2026, 1, 5), interval=3, day_of_month=15),
     {"type": "absoluteMonthly", "interval": 3, "dayOfMonth": 15}),
    (Pattern(PatternType.RELATIVE_MONTHLY, dt.date(2026, 1, 5), days_of_week=("friday",),
             index=WeekIndex.LAST),
     {"type": "relativeMonthly", "interval": 1, "daysOfWeek": ["friday"], "index": "last"}),
    (Pattern(PatternType.ABSOLUTE_YEARLY, dt.date(2026, 1, 5), day_of_month=15, month=3),
     {"type": "absoluteYearly", "interval": 1, "dayOfMonth": 15, "month": 3}),
    (Pattern(PatternType.RELATIVE_YEARLY, dt.date(2026, 1, 5), days_of_week=("thursday",),
             index=WeekIndex.FOURTH, month=11),
     {"type": "relativeYearly", "interval": 1, "daysOfWeek": ["thursday"], "index": "fourth",
      "month": 11}),
])
def test_each_pattern_type_round_trips_with_only_its_own_properties(
        pattern: Pattern, json_pattern: dict[str, Any]) -> None:
    written = recurrence_json(pattern, "UTC")
    assert written["pattern"] == json_pattern
    assert written["range"] == {"type": "noEnd", "startDate": "2026-01-05",
                                "recurrenceTimeZone": "UTC"}
    # Graph answers with every field filled in (month 0, dayOfMonth 0, …): read it back
    filled = {"type": json_pattern["type"], "interval": json_pattern["interval"], "month": 0,
              "dayOfMonth": 0, "daysOfWeek": [], "firstDayOfWeek": "sunday", "index": "first",
              **json_pattern}
    back = pattern_of({"pattern": filled, "range": {
        "type": "noEnd", "startDate": "2026-01-05", "endDate": "0001-01-01",
        "recurrenceTimeZone": "UTC", "numberOfOccurrences": 0}})
    expected = pattern if pattern.type is PatternType.WEEKLY else Pattern(
        pattern.type, pattern.start, pattern.interval, pattern.days_of_week,
        pattern.day_of_month, pattern.month, pattern.index, "monday")
    assert back == expected


def test_windows_and_iana_zone_names() -> None:
    assert windows_zone("Europe/Berlin") == "W. Europe Standard Time"
    assert windows_zone("Europe/Madrid") == "Romance Standard Time"  # shares Paris' zone
    assert iana_zone("Romance Standard Time") == "Europe/Paris"
    assert iana_zone("Pacific Standard Time") == "America/Los_Angeles"
    assert windows_zone("UTC") == iana_zone("UTC") == "UTC"
    assert iana_zone("Europe/Berlin") == "Europe/Berlin"  # Graph also accepts IANA names
    assert iana_zone("tzone://Microsoft/Custom") is None and windows_zone("Mars/Olympus") is None


def weekly(**kw: Any) -> Appointment:
    start = dt.datetime(2026, 3, 16, 9, tzinfo=BERLIN)
    base: dict[str, Any] = dict(uid="w", subject="Weekly", start=start,
                                end=start + dt.timedelta(hours=1), timezone="Europe/Berlin",
                                rrule="FREQ=WEEKLY;COUNT=4")
    return Appointment(**{**base, **kw})


def test_a_series_is_written_in_its_own_zone_with_the_documented_recurrence() -> None:
    body = graph_items.event_body(weekly(), invitations=False)
    assert body["start"] == {"dateTime": "2026-03-16T09:00:00",
                             "timeZone": "W. Europe Standard Time"}
    assert body["end"] == {"dateTime": "2026-03-16T10:00:00",
                           "timeZone": "W. Europe Standard Time"}
    assert body["recurrence"] == {
        "pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"],
                    "firstDayOfWeek": "monday"},
        "range": {"type": "numbered", "startDate": "2026-03-16", "numberOfOccurrences": 4,
                  "recurrenceTimeZone": "W. Europe Standard Time"}}


@pytest.mark.parametrize(("record", "words"), [
    (weekly(rrule="FREQ=MONTHLY;BYMONTHDAY=1,15"), "FREQ=MONTHLY;BYMONTHDAY=1,15"),
    (weekly(rrule="FREQ=WEEKLY;BYDAY=TU;COUNT=4"), "not an occurrence of RRULE"),
    (weekly(timezone="Mars/Olympus"), "Mars/Olympus"),
    (weekly(rrule="", cancelled_occurrences=(dt.datetime(2026, 3, 23, 9, tzinfo=BERLIN),)),
     "without an RRULE"),
])
def test_what_exchange_cannot_store_is_refused_naming_it(record: Appointment,
                                                         words: str) -> None:
    with pytest.raises(ItemError) as caught:
        graph_items.event_body(record, invitations=False)
    assert words in caught.value.message


def occurrence(day: int, hour: int = 9) -> Occurrence:
    start = dt.datetime(2026, 3, day, hour, tzinfo=BERLIN)
    return Occurrence(dt.datetime(2026, 3, 23, 9, tzinfo=BERLIN), start,
                      start + dt.timedelta(hours=1), "moved")


@pytest.mark.parametrize(("record", "words"), [
    (weekly(cancelled_occurrences=(dt.datetime(2026, 3, 24, 9, tzinfo=BERLIN),)),
     "is not an occurrence of RRULE"),
    (weekly(occurrences=(occurrence(30),)), "may not share a day with"),  # onto the next one
    (weekly(occurrences=(occurrence(16, 15),)), "may not share a day with"),
    (weekly(occurrences=(occurrence(24),),
            cancelled_occurrences=(dt.datetime(2026, 3, 23, 9, tzinfo=BERLIN),)),
     "cancelled or changed twice"),
    (weekly(rrule="FREQ=WEEKLY", cancelled_occurrences=(
        dt.datetime(2026, 3, 16, 9, tzinfo=BERLIN) + dt.timedelta(weeks=130),)),
     f"more than {HORIZON.days} days ahead"),
])
def test_occurrences_exchange_cannot_hold_or_we_could_not_read_back_are_refused(
        record: Appointment, words: str) -> None:
    series = Series.of(record)
    with pytest.raises(ItemError) as caught:
        check_occurrences(record, series, window(series, dt.datetime(2026, 3, 1, tzinfo=dt.UTC)))
    assert words in caught.value.message


def test_an_endless_series_is_read_up_to_the_horizon() -> None:
    record = weekly(rrule="FREQ=WEEKLY")
    series = Series.of(record)
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    win = window(series, now)
    first = dt.datetime(2026, 3, 16, 8, tzinfo=dt.UTC)
    assert win.known_until == first + HORIZON
    assert (win.start, win.end) == (first - PAD, first + HORIZON + PAD)
    assert len(win.keys) == 105  # weekly over 730 days


def test_a_recurring_to_do_task_is_anchored_on_its_due_date() -> None:
    task = graph_items.task_record(fixture("todo-task-recurring.json")["body"])
    assert task.due == dt.datetime(2026, 1, 6, tzinfo=dt.UTC)
    assert task.rrule == "FREQ=WEEKLY;BYDAY=TU;WKST=SU"
    written = graph_items.task_body(Task(uid="t", subject="Timesheet", due=task.due,
                                         rrule="FREQ=WEEKLY;BYDAY=TU;COUNT=5"))
    assert written["recurrence"] == {
        "pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["tuesday"],
                    "firstDayOfWeek": "monday"},
        "range": {"type": "numbered", "startDate": "2026-01-06", "numberOfOccurrences": 5,
                  "recurrenceTimeZone": "UTC"}}
    with pytest.raises(ItemError, match="due date"):
        graph_items.task_body(Task(uid="t", subject="x", rrule="FREQ=DAILY"))
    with pytest.raises(Unrepresentable, match="FREQ=HOURLY"):
        graph_items.task_body(Task(uid="t", subject="x", due=task.due, rrule="FREQ=HOURLY"))
    assert graph_items.task_body(Task(uid="t", subject="x"), update=True)["recurrence"] is None
