"""RRULE <-> Exchange pattern conversion (`core.recurrence`).

The key property: rewriting a rule into Exchange's pattern and back never moves an
occurrence — the canonical rule expands to exactly the dates of the original one.
"""

from __future__ import annotations

import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest
from dateutil import rrule as du
from hypothesis import given, settings
from hypothesis import strategies as st

from serversync.core.recurrence import (
    Pattern,
    PatternType,
    Unrepresentable,
    WeekIndex,
    canonical_rrule,
    from_rrule,
    instance_index,
    starts,
    to_rrule,
)

BERLIN = "Europe/Berlin"
START = dt.datetime(2026, 1, 5, 9, 0, tzinfo=ZoneInfo(BERLIN))  # a Monday


@pytest.mark.parametrize(("rule", "expected"), [
    ("FREQ=DAILY;COUNT=5", Pattern(PatternType.DAILY, dt.date(2026, 1, 5), count=5,
                                   first_day_of_week="monday")),
    ("FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,WE", Pattern(
        PatternType.WEEKLY, dt.date(2026, 1, 5), interval=2, days_of_week=("monday", "wednesday"),
        first_day_of_week="monday")),
    ("FREQ=DAILY;BYDAY=MO,TU,WE,TH,FR", Pattern(
        PatternType.WEEKLY, dt.date(2026, 1, 5),
        days_of_week=("monday", "tuesday", "wednesday", "thursday", "friday"),
        first_day_of_week="monday")),
    ("FREQ=MONTHLY;BYDAY=-1FR;UNTIL=20261231T235959Z", Pattern(
        PatternType.RELATIVE_MONTHLY, dt.date(2026, 1, 5), days_of_week=("friday",),
        index=WeekIndex.LAST, first_day_of_week="monday", end=dt.date(2026, 12, 31))),
    ("FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=1", Pattern(
        PatternType.RELATIVE_MONTHLY, dt.date(2026, 1, 5),
        days_of_week=("monday", "tuesday", "wednesday", "thursday", "friday"),
        first_day_of_week="monday")),
    ("FREQ=YEARLY", Pattern(PatternType.ABSOLUTE_YEARLY, dt.date(2026, 1, 5), day_of_month=5,
                            month=1, first_day_of_week="monday")),
    ("FREQ=YEARLY;BYMONTH=11;BYDAY=4TH", Pattern(
        PatternType.RELATIVE_YEARLY, dt.date(2026, 1, 5), days_of_week=("thursday",),
        index=WeekIndex.FOURTH, month=11, first_day_of_week="monday")),
])
def test_rules_become_exchange_patterns(rule: str, expected: Pattern) -> None:
    assert from_rrule(rule, START, BERLIN) == expected


@pytest.mark.parametrize("rule", [
    "FREQ=HOURLY;COUNT=3", "FREQ=DAILY;BYHOUR=9,17", "FREQ=MONTHLY;BYMONTHDAY=1,15",
    "FREQ=MONTHLY;BYDAY=1MO,3WE", "FREQ=MONTHLY;BYDAY=MO", "FREQ=MONTHLY;BYMONTHDAY=-1",
    "FREQ=WEEKLY;BYDAY=2MO", "FREQ=DAILY;INTERVAL=2;BYDAY=MO,FR", "FREQ=YEARLY;BYMONTH=1,7",
    "FREQ=MONTHLY;BYDAY=MO,TU;BYSETPOS=2", "FREQ=DAILY;COUNT=2;UNTIL=20260101",
    "FREQ=MONTHLY;BYDAY=5MO",
])
def test_rules_outside_exchange_are_refused_not_approximated(rule: str) -> None:
    with pytest.raises(Unrepresentable) as caught:
        from_rrule(rule, START, BERLIN)
    assert caught.value.code == "unsupported-recurrence"
    assert rule.split(";")[0] in caught.value.message or "RRULE" in caught.value.message


def test_until_is_inclusive_at_the_series_start_time() -> None:
    pattern = Pattern(PatternType.WEEKLY, dt.date(2026, 1, 5), days_of_week=("monday",),
                      first_day_of_week="monday", end=dt.date(2026, 1, 26))
    rule = to_rrule(pattern, START, BERLIN)
    assert rule == "FREQ=WEEKLY;BYDAY=MO;UNTIL=20260126T080000Z"
    assert len(list(starts(rule, START, BERLIN))) == 4
    all_day = to_rrule(pattern, dt.date(2026, 1, 5), BERLIN)
    assert all_day == "FREQ=WEEKLY;BYDAY=MO;UNTIL=20260126"


def test_wall_clock_time_holds_across_daylight_saving() -> None:
    rule = "FREQ=WEEKLY;BYDAY=MO;COUNT=14"
    times = {s.time() for s in starts(rule, START, BERLIN) if isinstance(s, dt.datetime)}
    assert times == {dt.time(9, 0)}  # March 29 2026 changes the offset, not the meeting


def test_instance_index_counts_from_one() -> None:
    rule = "FREQ=WEEKLY;BYDAY=MO,WE;COUNT=6"
    assert instance_index(rule, START, BERLIN, START) == 1
    wednesday = dt.datetime(2026, 1, 14, 8, 0, tzinfo=dt.UTC)  # 09:00 Berlin
    assert instance_index(rule, START, BERLIN, wednesday) == 4
    assert instance_index(rule, START, BERLIN, wednesday + dt.timedelta(hours=1)) is None
    assert instance_index(rule, START, BERLIN, dt.datetime(2027, 1, 4, 8, tzinfo=dt.UTC)) is None
    day = dt.date(2026, 1, 5)
    assert instance_index("FREQ=DAILY;COUNT=3", day, BERLIN, dt.date(2026, 1, 7)) == 3


_DAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]


def _until(days: int) -> str:
    return f";UNTIL={(dt.date(2026, 1, 5) + dt.timedelta(days=days)):%Y%m%d}T080000Z"


rules = st.one_of(
    st.builds(lambda i: f"FREQ=DAILY;INTERVAL={i}", st.integers(1, 5)),
    st.builds(lambda i, d: f"FREQ=WEEKLY;INTERVAL={i};BYDAY={','.join(d)}",
              st.integers(1, 3), st.lists(st.sampled_from(_DAYS), min_size=1, max_size=7,
                                          unique=True)),
    st.builds(lambda i, m: f"FREQ=MONTHLY;INTERVAL={i};BYMONTHDAY={m}",
              st.integers(1, 3), st.integers(1, 28)),
    st.builds(lambda n, d: f"FREQ=MONTHLY;BYDAY={n}{d}",
              st.sampled_from(["1", "2", "3", "4", "-1"]), st.sampled_from(_DAYS)),
    st.builds(lambda m, d: f"FREQ=YEARLY;BYMONTH={m};BYMONTHDAY={d}",
              st.integers(1, 12), st.integers(1, 28)),
    st.builds(lambda m, n, d: f"FREQ=YEARLY;BYMONTH={m};BYDAY={n}{d}",
              st.integers(1, 12), st.sampled_from(["1", "2", "-1"]), st.sampled_from(_DAYS)),
    st.builds(lambda i, d, p: f"FREQ=MONTHLY;INTERVAL={i};BYDAY={d};BYSETPOS={p}",
              st.integers(1, 3), st.sampled_from(["MO,TU,WE,TH,FR", "SA,SU",
                                                  "MO,TU,WE,TH,FR,SA,SU"]),
              st.sampled_from(["1", "2", "4", "-1"])),
    st.builds(lambda n: f"FREQ=MONTHLY;BYMONTHDAY={','.join(map(str, range(28, n + 1)))}"
                        ";BYSETPOS=-1", st.integers(29, 31)),
    st.builds(lambda i, d, w: f"FREQ=WEEKLY;INTERVAL={i};BYDAY={','.join(d)};WKST={w}",
              st.integers(2, 3), st.lists(st.sampled_from(_DAYS), min_size=2, max_size=4,
                                          unique=True), st.sampled_from(["SU", "MO", "WE"])),
)
ends = st.one_of(st.just(""), st.builds(lambda c: f";COUNT={c}", st.integers(1, 30)),
                 st.builds(_until, st.integers(0, 800)))
# (an UNTIL of 08:00 UTC on the first day falls before a 09:00 start in UTC and New York)


@settings(max_examples=150, deadline=None)
@given(rule=rules, end=ends, zone=st.sampled_from(["UTC", BERLIN, "America/New_York"]))
def test_canonical_rule_never_moves_an_occurrence(rule: str, end: str, zone: str) -> None:
    """Our standard-library expansion of the Exchange pattern, and python-dateutil's RFC
    5545 engine on both the original and the canonical rule, give the same occurrences."""
    start = dt.datetime(2026, 1, 5, 9, 0, tzinfo=ZoneInfo(zone))
    original = rule + end
    before = rfc5545(original, start)
    if not before:  # an UNTIL before the first occurrence: an empty series is refused
        with pytest.raises(Unrepresentable, match="before its first occurrence"):
            canonical_rrule(original, start, zone)
        return
    canonical = canonical_rrule(original, start, zone)
    assert canonical_rrule(canonical, start, zone) == canonical  # a fixed point
    assert rfc5545(canonical, start) == before
    assert list(itertools.islice(starts(original, start, zone), 60)) == before


def rfc5545(rule: str, start: dt.datetime) -> list[dt.datetime]:
    """The reference expansion (dateutil), first 60 occurrences."""
    return list(itertools.islice(du.rrulestr(rule, dtstart=start), 60))


@pytest.mark.parametrize(("rule", "day"), [
    ("FREQ=MONTHLY;BYMONTHDAY=31", 31), ("FREQ=MONTHLY;BYMONTHDAY=30", 30),
    ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29", 29), ("FREQ=YEARLY;BYMONTH=4;BYMONTHDAY=31", 31),
])
def test_days_past_the_shortest_month_are_refused(rule: str, day: int) -> None:
    """RRULE skips a month without that day; Exchange moves it to the month's last day
    (DayOfMonth, EWS reference): the two series differ, so the plain rule is refused."""
    with pytest.raises(Unrepresentable, match=f"no day {day}"):
        from_rrule(rule, START, BERLIN)


def test_exchange_day_31_is_the_months_last_day_exactly() -> None:
    pattern = Pattern(PatternType.ABSOLUTE_MONTHLY, dt.date(2026, 1, 31), day_of_month=31,
                      first_day_of_week="monday", count=4)
    start = dt.datetime(2026, 1, 31, 9, 0, tzinfo=ZoneInfo(BERLIN))
    rule = to_rrule(pattern, start, BERLIN)
    assert rule == "FREQ=MONTHLY;BYMONTHDAY=28,29,30,31;BYSETPOS=-1;COUNT=4"
    assert [s.date() for s in starts(rule, start, BERLIN) if isinstance(s, dt.datetime)] == [
        dt.date(2026, 1, 31), dt.date(2026, 2, 28), dt.date(2026, 3, 31), dt.date(2026, 4, 30)]
    assert from_rrule(rule, start, BERLIN) == pattern
    feb = Pattern(PatternType.ABSOLUTE_YEARLY, dt.date(2028, 2, 29), day_of_month=29, month=2,
                  first_day_of_week="monday")
    leap = dt.datetime(2028, 2, 29, 9, 0, tzinfo=ZoneInfo(BERLIN))
    text = to_rrule(feb, leap, BERLIN)
    assert text == "FREQ=YEARLY;BYMONTHDAY=28,29;BYSETPOS=-1;BYMONTH=2"
    assert [s.date() for s in itertools.islice(starts(text, leap, BERLIN), 2)
            if isinstance(s, dt.datetime)] == [dt.date(2028, 2, 29), dt.date(2029, 2, 28)]
    assert canonical_rrule(text, leap, BERLIN) == text
    with pytest.raises(Unrepresentable, match="BYSETPOS"):
        from_rrule("FREQ=MONTHLY;BYMONTHDAY=29,30;BYSETPOS=-1", START, BERLIN)


@pytest.mark.parametrize("rule", ["FREQ=DAILY;INTERVAL=3;COUNT=9", "FREQ=WEEKLY;BYDAY=TU,FR",
                                  "FREQ=MONTHLY;BYDAY=-1FR", "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=5"])
def test_all_day_series_expand_to_dates(rule: str) -> None:
    first = dt.date(2026, 1, 5)
    ours = list(itertools.islice(starts(rule, first, BERLIN), 20))
    reference = [m.date() for m in itertools.islice(
        du.rrulestr(rule, dtstart=dt.datetime(2026, 1, 5)), 20)]
    assert ours == reference and all(type(d) is dt.date for d in ours)
