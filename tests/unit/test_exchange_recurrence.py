"""Recurring appointments and tasks over EWS (`connectors.ews_items`): RRULE ↔ Recurrence.

The fixtures (``tests/fixtures/ews``, each naming the Microsoft page it follows) go through
exchangelib's own parser and serialiser: a documented recurring master reads as the exact
`Appointment` (canonical RRULE, IANA zone, EXDATEs, changed instance), documented task
recurrences read as RRULEs or are refused (regeneration), and the Recurrence we would send
is the documented one. Every refusal names the rule; nothing is approximated.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from exchangelib import CalendarItem
from exchangelib.recurrence import Recurrence
from exchangelib.services import GetItem
from lxml import etree

from serversync.connectors import ews, ews_items
from serversync.core.act import Appointment, Occurrence, Task
from serversync.core.errors import ItemError
from serversync.core.recurrence import Unrepresentable, canonical_rrule, from_rrule, to_rrule
from tests.unit.test_exchange import SOAP, offline_account

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ews"
T = "{http://schemas.microsoft.com/exchange/services/2006/types}"
BERLIN = ZoneInfo("Europe/Berlin")
START = dt.datetime(2031, 3, 17, 9, 0, tzinfo=BERLIN)  # a Monday
WEEK = dt.timedelta(weeks=1)
UTC = dt.UTC


def parsed(name: str) -> list[Any]:
    """The items of a GetItem response fixture, as exchangelib parses them."""
    root = etree.parse(str(FIXTURES / name)).getroot()
    service = GetItem(account=offline_account())
    out = []
    for message in service._get_soap_messages(body=root.find(f"{SOAP}Body")):
        container = service._get_element_container(message=message,
                                                   name=service.element_container_name)
        out.extend(service._elem_to_obj(e) for e in container)
    return out


def tree(element: etree._Element) -> tuple[Any, ...]:
    """Tag, attributes, text and children: the XML without namespace-prefix noise."""
    return (element.tag, sorted(element.attrib.items()), (element.text or "").strip(),
            [tree(child) for child in element])


def series(**kw: Any) -> Appointment:
    base = dict(uid="s", subject="Planning", start=START, end=START + dt.timedelta(hours=1),
                timezone="Europe/Berlin", rrule="FREQ=WEEKLY;BYDAY=MO;COUNT=10")
    base.update(kw)
    return Appointment(**base)


def test_a_documented_master_reads_as_the_exact_series() -> None:
    [master] = parsed("getitem-recurring-master-response.xml")
    assert isinstance(master, CalendarItem) and master.type == "RecurringMaster"
    exception = CalendarItem(subject="Planning (moved)", location="Room 2", body=None,
                             start=master.modified_occurrences[0].start,
                             end=master.modified_occurrences[0].end)
    record = ews_items.to_record(master, {"AAMkADkOcc5=": exception})
    assert record == Appointment(
        uid="weekly-1", subject="Planning", start=dt.datetime(2031, 3, 17, 8, tzinfo=UTC),
        end=dt.datetime(2031, 3, 17, 9, tzinfo=UTC), timezone="Europe/Berlin",
        location="Room 1", rrule="FREQ=WEEKLY;BYDAY=MO;COUNT=10", reminder_minutes=15,
        body="Agenda", cancelled_occurrences=(dt.datetime(2031, 3, 31, 7, tzinfo=UTC),),
        occurrences=(Occurrence(dt.datetime(2031, 4, 14, 7, tzinfo=UTC),
                                dt.datetime(2031, 4, 15, 8, tzinfo=UTC),
                                dt.datetime(2031, 4, 15, 9, tzinfo=UTC),
                                "Planning (moved)", "Room 2"),))
    with pytest.raises(ItemError, match="changed occurrence .* could not be read"):
        ews_items.to_record(master, {})  # never a series without its exceptions


def test_documented_task_recurrences() -> None:
    books, plants = parsed("getitem-recurring-task-response.xml")
    task = ews_items.to_record(books)
    assert isinstance(task, Task) and task.due == dt.date(2031, 1, 31)
    assert task.rrule == "FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1;UNTIL=20311231"
    with pytest.raises(ItemError) as caught:
        ews_items.to_record(plants)
    assert caught.value.code == "unsupported-recurrence"
    assert "regenerates 3 day(s) after each completion (DailyRegeneration)" in \
        caught.value.message and "iCalendar has no rule" in caught.value.message


def test_the_recurrence_we_send_is_the_documented_one() -> None:
    fixture = etree.parse(str(FIXTURES / "createitem-recurring-calendaritem-request.xml"),
                          etree.XMLParser(remove_blank_text=True))
    documented = fixture.getroot().find(f".//{T}CalendarItem/{T}Recurrence")
    assert documented is not None
    plan = ews_items.plan_series(series())
    built = etree.fromstring(etree.tostring(plan.recurrence.to_xml(version=ews.SERVER_VERSION)))
    assert tree(built) == tree(documented)


@pytest.mark.parametrize("rule", [
    "FREQ=DAILY;INTERVAL=3;COUNT=7",
    "FREQ=DAILY;BYDAY=MO,TU,WE,TH,FR",
    "FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,TH;WKST=SU;UNTIL=20311231T080000Z",
    "FREQ=MONTHLY;BYMONTHDAY=17",
    "FREQ=MONTHLY;BYMONTHDAY=28,29,30,31;BYSETPOS=-1",
    "FREQ=MONTHLY;INTERVAL=3;BYDAY=3MO",
    "FREQ=MONTHLY;BYDAY=-1MO",
    "FREQ=MONTHLY;BYDAY=SA,SU;BYSETPOS=1",
    "FREQ=YEARLY;BYMONTH=3;BYMONTHDAY=17",
    "FREQ=YEARLY;BYMONTH=3;BYDAY=3MO",
])
def test_every_exchange_pattern_survives_the_wire(rule: str) -> None:
    """RRULE → Recurrence XML → exchangelib's parser → RRULE gives the canonical rule."""
    element = ews_items.ews_recurrence(from_rrule(rule, START, "Europe/Berlin"), rule).to_xml(
        version=ews.SERVER_VERSION)
    back = Recurrence.from_xml(etree.fromstring(etree.tostring(element)), account=None)
    pattern = ews_items.our_pattern(back, "test")
    assert to_rrule(pattern, START, "Europe/Berlin") == canonical_rrule(rule, START,
                                                                         "Europe/Berlin")


@pytest.mark.parametrize(("record", "words"), [
    (series(rrule="FREQ=YEARLY;INTERVAL=2"), "INTERVAL=2 cannot be stored"),
    (series(rrule="FREQ=DAILY;COUNT=1000"), "at most 999 occurrences"),
    (series(rrule="FREQ=DAILY;INTERVAL=1000"), "interval of at most 999"),
    (series(rrule="FREQ=WEEKLY;INTERVAL=100;BYDAY=MO"), "interval of at most 99"),
    (series(rrule="FREQ=MONTHLY;BYDAY=1MO,3WE"), "one week number per series"),
    (series(rrule="FREQ=WEEKLY;BYDAY=TU"), "not an occurrence of RRULE"),
    (series(timezone="Mars/Olympus_Mons"), "no Windows time zone"),
    (series(cancelled_occurrences=(START + dt.timedelta(days=1),)),
     "is not an occurrence of RRULE"),
    (series(cancelled_occurrences=(START + WEEK,),
            occurrences=(Occurrence(START + WEEK, START, START, "x"),)),
     "cancelled or changed twice"),
    (series(occurrences=(Occurrence(START + 2 * WEEK, START + WEEK + dt.timedelta(hours=3),
                                    START + WEEK + dt.timedelta(hours=4), "onto its neighbour"),)),
     "reaches the day of the previous occurrence"),
    (series(occurrences=(Occurrence(START + 2 * WEEK, START + 3 * WEEK,
                                    START + 3 * WEEK + dt.timedelta(hours=1), "past it"),)),
     "reaches the day of the next occurrence"),
])
def test_what_exchange_cannot_store_is_refused_before_any_request(record: Appointment,
                                                                  words: str) -> None:
    with pytest.raises(ItemError) as caught:
        ews_items.from_record(record, account=None, folder=None, invitations=False)
    assert words in caught.value.message
    if isinstance(caught.value, Unrepresentable):
        assert record.rrule in caught.value.message


def test_a_recurring_task_is_anchored_on_its_due_date() -> None:
    task = Task(uid="t", subject="Report", due=dt.date(2031, 3, 21), priority=5,
                rrule="FREQ=WEEKLY;BYDAY=FR;COUNT=5")
    item = ews_items.from_record(task, account=None, folder=None, invitations=False)
    assert item.recurrence.boundary.start == dt.date(2031, 3, 21)
    assert ews_items.read_back(task, False) == task  # nothing changes on the way
    with pytest.raises(Unrepresentable, match="not an occurrence"):
        ews_items.from_record(Task(uid="t", subject="x", due=dt.date(2031, 3, 20),
                                   rrule="FREQ=WEEKLY;BYDAY=FR"),
                              account=None, folder=None, invitations=False)
    with pytest.raises(ItemError, match="needs a due or start date"):
        ews_items.from_record(Task(uid="t", subject="x", rrule="FREQ=DAILY"),
                              account=None, folder=None, invitations=False)


def test_changed_occurrences_are_written_in_an_order_that_crosses_nothing() -> None:
    """Moving the 2nd and 3rd later, or the 5th and 6th earlier, in the wrong order would
    put one onto its neighbour's day on the way (ErrorOccurrenceCrossingBoundary)."""
    day = dt.timedelta(days=1)
    moved = tuple(Occurrence(START + i * WEEK, START + i * WEEK + shift,
                             START + i * WEEK + shift + dt.timedelta(hours=1), f"#{i + 1}")
                  for i, shift in ((1, 6 * day), (2, 5 * day), (4, -5 * day), (5, -6 * day)))
    plan = ews_items.plan_series(series(occurrences=moved))
    assert plan.update_order() == [5, 6, 3, 2]
    assert plan.zone == "Europe/Berlin" and plan.cancelled == {}


def test_zones_read_back_as_exchange_names_them() -> None:
    assert ews_items.plan_series(series(timezone="Europe/Amsterdam")).zone == "Europe/Berlin"
    assert ews_items.plan_series(series(timezone="UTC")).zone == "UTC"
    expected = ews_items.read_back(series(timezone="Europe/Amsterdam"), False)
    assert isinstance(expected, Appointment) and expected.timezone == "Europe/Berlin"


def test_occurrences_and_exceptions_are_not_records() -> None:
    [master] = parsed("getitem-recurring-master-response.xml")
    assert not ews_items.is_series_part(master)
    for kind in ("Occurrence", "Exception"):
        part = CalendarItem(subject="x")
        part.type = kind
        assert ews_items.is_series_part(part)
