"""Recurrence rules in the two shapes we meet: RFC 5545 RRULE and Exchange's patterns.

The application (and CalDAV) keep a recurring series as an iCalendar RRULE; Exchange keeps it
as a *pattern* plus a *range* — EWS ``Recurrence`` (``DailyRecurrence``,
``WeeklyRecurrence``, ``AbsoluteMonthlyRecurrence``, ``RelativeMonthlyRecurrence``,
``AbsoluteYearlyRecurrence``, ``RelativeYearlyRecurrence`` with ``NoEndRecurrence``,
``EndDateRecurrence`` or ``NumberedRecurrence``) and Microsoft Graph ``patternedRecurrence``
(the same six pattern types and three range types under other names). Both connectors
convert through `Pattern`, so the rules about what Exchange can express live in one place.

Exchange's patterns are a strict subset of RRULE: a rule outside it (``FREQ=HOURLY``,
``BYHOUR``, two ``BYMONTHDAY`` values, ``BYDAY=1MO,3WE`` …) raises `Unrepresentable`, an
`ItemError` the ACT service quarantines or reports with the rule's text — it is never
approximated, because a "close enough" series puts meetings on the wrong days.

`to_rrule` writes one canonical RRULE per pattern, so a rule read back from Exchange hashes
the same every time. `starts` and `instance_index` expand a series in its own time zone
(wall-clock times stay put across daylight-saving changes, as Outlook shows them): EWS
addresses an occurrence by its 1-based instance index, Graph by its original start.

Standard library only (DESIGN.md: core imports nothing else): the expansion is written for
Exchange's six patterns, which is all it needs; the unit tests check it against
python-dateutil's RFC 5545 engine.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterator
from dataclasses import dataclass, replace
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from serversync.core.errors import ItemError


class Unrepresentable(ItemError):
    """An RRULE Exchange has no pattern for (or an Exchange pattern RRULE cannot say)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, fix="use a daily, weekly, monthly or yearly rule Outlook can "
                         "show (one day of the month, or one weekday in a given week)",
                         code="unsupported-recurrence")


class PatternType(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    ABSOLUTE_MONTHLY = "absoluteMonthly"
    RELATIVE_MONTHLY = "relativeMonthly"
    ABSOLUTE_YEARLY = "absoluteYearly"
    RELATIVE_YEARLY = "relativeYearly"


class WeekIndex(enum.StrEnum):
    """Which week of the month (Graph ``weekIndex``; EWS ``DayOfWeekIndex``)."""

    FIRST = "first"
    SECOND = "second"
    THIRD = "third"
    FOURTH = "fourth"
    LAST = "last"


DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_RFC_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
_INDEX_OUT = {WeekIndex.FIRST: 1, WeekIndex.SECOND: 2, WeekIndex.THIRD: 3,
              WeekIndex.FOURTH: 4, WeekIndex.LAST: -1}
_INDEX_IN = {v: k for k, v in _INDEX_OUT.items()}
_PARTS = {"FREQ", "INTERVAL", "COUNT", "UNTIL", "BYDAY", "BYMONTHDAY", "BYMONTH", "BYSETPOS",
          "WKST"}


@dataclass(frozen=True, slots=True)
class Pattern:
    """A recurring series as Exchange stores it: a pattern and a range.

    ``days_of_week`` holds lower-case English day names (Graph's spelling; EWS capitalises
    them). ``start`` is the first day of the range in the series' time zone; ``end`` (an
    inclusive last day) and ``count`` are mutually exclusive, neither means no end.
    """

    type: PatternType
    start: dt.date
    interval: int = 1
    days_of_week: tuple[str, ...] = ()
    day_of_month: int = 0
    month: int = 0
    index: WeekIndex = WeekIndex.FIRST
    first_day_of_week: str = "sunday"
    end: dt.date | None = None
    count: int | None = None


def _parts(rule: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for part in rule.strip().upper().removeprefix("RRULE:").split(";"):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq or name in parts:
            raise Unrepresentable(f"{rule!r} is not a valid RRULE")
        parts[name] = value
    unknown = set(parts) - _PARTS
    if unknown:
        raise Unrepresentable(f"RRULE {rule!r}: Exchange has no equivalent of "
                              f"{', '.join(sorted(unknown))}")
    return parts


def _int(parts: dict[str, str], name: str, rule: str, default: int | None = None) -> int:
    if name not in parts:
        if default is None:
            raise Unrepresentable(f"RRULE {rule!r} needs {name}")
        return default
    try:
        return int(parts[name])
    except ValueError:
        raise Unrepresentable(f"RRULE {rule!r}: {name}={parts[name]} is not a number") from None


def _day(code: str, rule: str) -> str:
    if code not in _RFC_DAYS:
        raise Unrepresentable(f"RRULE {rule!r}: {code!r} is not a weekday")
    return DAYS[_RFC_DAYS.index(code)]


def _ordinal_days(value: str, rule: str) -> tuple[int | None, tuple[str, ...]]:
    """``BYDAY`` split into one shared ordinal (or None) and the days it applies to."""
    ordinals: set[int | None] = set()
    days: list[str] = []
    for item in value.split(","):
        code = item[-2:]
        head = item[:-2]
        ordinals.add(int(head) if head not in ("", "+") else None)
        days.append(_day(code, rule))
    if len(ordinals) != 1:
        raise Unrepresentable(f"RRULE {rule!r}: days with different week numbers "
                              "(Exchange allows one week number per series)")
    return ordinals.pop(), tuple(sorted(set(days), key=DAYS.index))


def local_start(start: dt.datetime | dt.date, zone: str) -> dt.datetime | dt.date:
    """``start`` as wall-clock time in ``zone`` (dates stay dates)."""
    if not isinstance(start, dt.datetime):
        return start
    if start.tzinfo is None:
        return start
    return start.astimezone(tzinfo(zone))


def tzinfo(zone: str) -> dt.tzinfo:
    try:
        return ZoneInfo(zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def _day_of(start: dt.datetime | dt.date) -> dt.date:
    return start.date() if isinstance(start, dt.datetime) else start


def _until_day(value: str, first: dt.datetime | dt.date, zone: str) -> dt.date:
    """The inclusive last day of an RRULE UNTIL, in the series' zone.

    Exchange ends a series on a *day*; UNTIL is an instant. An UNTIL earlier in its day than
    the series' start time excludes that day's occurrence, so the last day is the one before.
    """
    text = value.rstrip("Z")
    try:
        if len(text) == 8:
            return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        moment = dt.datetime.strptime(text, "%Y%m%dT%H%M%S")
    except ValueError:
        raise Unrepresentable(f"UNTIL={value} is not an iCalendar date or date-time") from None
    if value.endswith("Z"):
        moment = moment.replace(tzinfo=dt.UTC).astimezone(tzinfo(zone)).replace(tzinfo=None)
    if isinstance(first, dt.datetime) and moment.time() < first.time():
        return moment.date() - dt.timedelta(days=1)
    return moment.date()


def from_rrule(rule: str, start: dt.datetime | dt.date, zone: str = "UTC") -> Pattern:
    """The Exchange pattern of ``rule`` for a series starting at ``start`` in ``zone``.

    Defaults follow RFC 5545: a missing BYDAY / BYMONTHDAY / BYMONTH comes from DTSTART.
    """
    pattern = _pattern(rule, start, zone)
    if pattern.end is not None and next(expand(pattern, start, zone), None) is None:
        raise Unrepresentable(f"RRULE {rule!r} ends before its first occurrence")
    return pattern


def _pattern(rule: str, start: dt.datetime | dt.date, zone: str) -> Pattern:
    parts = _parts(rule)
    first = local_start(start, zone)
    day = _day_of(first)
    interval = _int(parts, "INTERVAL", rule, 1)
    if interval < 1:
        raise Unrepresentable(f"RRULE {rule!r}: INTERVAL must be at least 1")
    wkst = _day(parts.get("WKST", "MO"), rule)  # RFC 5545 default
    end = count = None
    if "UNTIL" in parts and "COUNT" in parts:
        raise Unrepresentable(f"RRULE {rule!r} has both UNTIL and COUNT")
    if "UNTIL" in parts:
        end = _until_day(parts["UNTIL"], first, zone)
        if end < day:
            raise Unrepresentable(f"RRULE {rule!r} ends before its first occurrence")
    elif "COUNT" in parts:
        count = _int(parts, "COUNT", rule)
        if count < 1:
            raise Unrepresentable(f"RRULE {rule!r}: COUNT must be at least 1")
    base = Pattern(PatternType.DAILY, start=day, interval=interval, first_day_of_week=wkst,
                   end=end, count=count)
    freq = parts.get("FREQ", "")
    byday, bymonthday = parts.get("BYDAY"), parts.get("BYMONTHDAY")
    setpos = parts.get("BYSETPOS")
    if freq == "DAILY":
        if bymonthday or "BYMONTH" in parts or setpos:
            raise Unrepresentable(f"RRULE {rule!r}: a daily rule filtered by month or day "
                                  "of month")
        if byday:
            ordinal, days = _ordinal_days(byday, rule)
            if ordinal is not None or interval != 1:
                raise Unrepresentable(f"RRULE {rule!r}: daily on chosen weekdays only "
                                      "works every day (INTERVAL=1)")
            return replace(base, type=PatternType.WEEKLY, days_of_week=days)
        return base
    if freq == "WEEKLY":
        if bymonthday or "BYMONTH" in parts or setpos:
            raise Unrepresentable(f"RRULE {rule!r}: a weekly rule filtered by month")
        if byday:
            ordinal, days = _ordinal_days(byday, rule)
            if ordinal is not None:
                raise Unrepresentable(f"RRULE {rule!r}: week numbers in a weekly rule")
        else:
            days = (DAYS[day.weekday()],)
        return replace(base, type=PatternType.WEEKLY, days_of_week=days)
    if freq in ("MONTHLY", "YEARLY"):
        yearly = freq == "YEARLY"
        month = 0
        if yearly:
            month = _int(parts, "BYMONTH", rule, day.month) if "," not in parts.get(
                "BYMONTH", "") else 0
            if not 1 <= month <= 12:
                raise Unrepresentable(f"RRULE {rule!r}: one month of the year is needed")
        elif "BYMONTH" in parts:
            raise Unrepresentable(f"RRULE {rule!r}: a monthly rule filtered by month")
        if byday:
            if bymonthday:
                raise Unrepresentable(f"RRULE {rule!r}: both BYDAY and BYMONTHDAY")
            ordinal, days = _ordinal_days(byday, rule)
            if setpos is not None:
                if ordinal is not None or "," in setpos:
                    raise Unrepresentable(f"RRULE {rule!r}: BYSETPOS with week numbers")
                ordinal = _int(parts, "BYSETPOS", rule)
            if ordinal not in _INDEX_IN:
                raise Unrepresentable(f"RRULE {rule!r}: Exchange knows the first to fourth "
                                      "and the last week of a month")
            if len(days) > 1 and (days not in (DAYS, DAYS[:5], DAYS[5:]) or setpos is None):
                raise Unrepresentable(f"RRULE {rule!r}: several weekdays in one week of the "
                                      "month (Exchange knows one weekday, any day, a weekday "
                                      "or a weekend day with BYSETPOS)")
            return replace(base, type=PatternType.RELATIVE_YEARLY if yearly
                           else PatternType.RELATIVE_MONTHLY,
                           days_of_week=days, index=_INDEX_IN[ordinal], month=month)
        if setpos:
            day_of_month = _clamped_day(parts, rule)
        else:
            if bymonthday and "," in bymonthday:
                raise Unrepresentable(f"RRULE {rule!r}: several days of the month")
            day_of_month = _int(parts, "BYMONTHDAY", rule, day.day)
            if not 1 <= day_of_month <= 31:
                raise Unrepresentable(f"RRULE {rule!r}: Exchange counts days of the month "
                                      "from the start (1 to 31)")
            if day_of_month > _shortest(month):
                raise Unrepresentable(
                    f"RRULE {rule!r}: RRULE skips the months that have no day {day_of_month}, "
                    "Exchange moves them to the month's last day (say "
                    f"BYMONTHDAY={','.join(map(str, range(28, day_of_month + 1)))};BYSETPOS=-1 "
                    "for Exchange's meaning)")
        return replace(base, type=PatternType.ABSOLUTE_YEARLY if yearly
                       else PatternType.ABSOLUTE_MONTHLY, day_of_month=day_of_month, month=month)
    raise Unrepresentable(f"RRULE {rule!r}: Exchange repeats daily, weekly, monthly or yearly")


def to_rrule(pattern: Pattern, start: dt.datetime | dt.date, zone: str = "UTC") -> str:
    """The canonical RRULE of ``pattern`` for a series starting at ``start`` in ``zone``.

    Every part is written explicitly (BYDAY, BYMONTHDAY, BYMONTH) so that equal series give
    equal text. A range end becomes UNTIL at the series' start time on its last day (UTC for
    timed series, a DATE for all-day ones), which RFC 5545 reads as inclusive.
    """
    parts = [f"FREQ={_FREQ[pattern.type]}"]
    if pattern.interval != 1:
        parts.append(f"INTERVAL={pattern.interval}")
    days = [_RFC_DAYS[DAYS.index(d)] for d in sorted(pattern.days_of_week, key=DAYS.index)]
    if pattern.type is PatternType.WEEKLY:
        parts.append("BYDAY=" + ",".join(days))
    elif pattern.type in (PatternType.RELATIVE_MONTHLY, PatternType.RELATIVE_YEARLY):
        if len(days) == 1:
            parts.append(f"BYDAY={_INDEX_OUT[pattern.index]}{days[0]}")
        else:
            parts.append("BYDAY=" + ",".join(days))
            parts.append(f"BYSETPOS={_INDEX_OUT[pattern.index]}")
    elif pattern.type in (PatternType.ABSOLUTE_MONTHLY, PatternType.ABSOLUTE_YEARLY):
        if pattern.day_of_month > _shortest(pattern.month):
            # Exchange's day 29-31 falls on the last day of a shorter month: the last of
            # the days 28..N that the month has
            days_text = ",".join(str(d) for d in range(28, pattern.day_of_month + 1))
            parts.append(f"BYMONTHDAY={days_text};BYSETPOS=-1")
        else:
            parts.append(f"BYMONTHDAY={pattern.day_of_month}")
    if pattern.type in (PatternType.ABSOLUTE_YEARLY, PatternType.RELATIVE_YEARLY):
        parts.append(f"BYMONTH={pattern.month}")
    if pattern.type is PatternType.WEEKLY and pattern.first_day_of_week != "monday":
        parts.append(f"WKST={_RFC_DAYS[DAYS.index(pattern.first_day_of_week)]}")
    if pattern.count is not None:
        parts.append(f"COUNT={pattern.count}")
    elif pattern.end is not None:
        parts.append(f"UNTIL={_until_text(pattern.end, start, zone)}")
    return ";".join(parts)


def _shortest(month: int) -> int:
    """The fewest days ``month`` has (0: any month, as in a monthly rule)."""
    return {0: 28, 2: 28, 4: 30, 6: 30, 9: 30, 11: 30}.get(month, 31)


def _clamped_day(parts: dict[str, str], rule: str) -> int:
    """Exchange's day N of the month, "or the month's last day when it is shorter", as RRULE
    says it exactly: ``BYMONTHDAY=28,...,N;BYSETPOS=-1`` (the last of those the month has)."""
    try:
        days = sorted(int(d) for d in parts.get("BYMONTHDAY", "").split(","))
    except ValueError:
        days = []
    if parts.get("BYSETPOS") != "-1" or not days or days != list(range(28, days[-1] + 1)) \
            or not 29 <= days[-1] <= 31:
        raise Unrepresentable(f"RRULE {rule!r}: BYSETPOS with days of the month other than "
                              "28,...,N;BYSETPOS=-1 (day N or the month's last day)")
    return days[-1]


_FREQ = {PatternType.DAILY: "DAILY", PatternType.WEEKLY: "WEEKLY",
         PatternType.ABSOLUTE_MONTHLY: "MONTHLY", PatternType.RELATIVE_MONTHLY: "MONTHLY",
         PatternType.ABSOLUTE_YEARLY: "YEARLY", PatternType.RELATIVE_YEARLY: "YEARLY"}


def _until_text(end: dt.date, start: dt.datetime | dt.date, zone: str) -> str:
    if not isinstance(start, dt.datetime):
        return end.strftime("%Y%m%d")
    local = local_start(start, zone)
    assert isinstance(local, dt.datetime)
    last = dt.datetime.combine(end, local.timetz() if local.tzinfo else local.time())
    if last.tzinfo is None:
        return last.strftime("%Y%m%dT%H%M%S")
    return last.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def canonical_rrule(rule: str, start: dt.datetime | dt.date, zone: str = "UTC") -> str:
    """``rule`` as Exchange will give it back (raises `Unrepresentable` if it cannot)."""
    return to_rrule(from_rrule(rule, start, zone), start, zone) if rule else ""


# ---------------------------------------------------------------- expansion

def starts(rule: str, start: dt.datetime | dt.date, zone: str = "UTC",
           ) -> Iterator[dt.datetime | dt.date]:
    """The occurrence starts of a series, in order, as wall-clock times in ``zone`` (dates
    for all-day series). Unbounded rules give an unbounded iterator. Only rules Exchange can
    express are expanded (others raise `Unrepresentable`): every series we sync is one."""
    return expand(from_rrule(rule, start, zone), start, zone)


def expand(pattern: Pattern, start: dt.datetime | dt.date, zone: str = "UTC",
           ) -> Iterator[dt.datetime | dt.date]:
    """The occurrence starts of ``pattern`` with Exchange's semantics, standard library only.

    Days are found period by period (day, week from ``first_day_of_week``, month, year);
    each keeps the series' wall-clock start time in ``zone`` (ZoneInfo resolves the offset
    of each day, so 09:00 stays 09:00 across daylight-saving changes). An absolute day past
    a month's end falls on its last day, as Exchange's DayOfMonth does. Days before
    ``start`` are skipped; the range ends after ``count`` occurrences or on ``end``.
    """
    first = local_start(start, zone)
    day0 = _day_of(first)
    for produced, day in enumerate(_days(pattern, day0)):
        if pattern.end is not None and day > pattern.end:
            return
        if pattern.count is not None and produced >= pattern.count:
            return
        if isinstance(first, dt.datetime):
            yield dt.datetime.combine(day, first.time(), first.tzinfo)
        else:
            yield day


def _month_days(year: int, month: int) -> int:
    following = dt.date(year + month // 12, month % 12 + 1, 1)
    return (following - dt.timedelta(days=1)).day


def _relative(year: int, month: int, pattern: Pattern) -> dt.date:
    """The first..fourth or last of the pattern's weekdays in a month."""
    wanted = {DAYS.index(d) for d in pattern.days_of_week}
    days = [dt.date(year, month, d) for d in range(1, _month_days(year, month) + 1)]
    matching = [d for d in days if d.weekday() in wanted]
    return matching[-1] if pattern.index is WeekIndex.LAST else \
        matching[_INDEX_OUT[pattern.index] - 1]


def _days(pattern: Pattern, day0: dt.date) -> Iterator[dt.date]:
    """Every day of the pattern from ``day0`` on, without end."""
    step = pattern.interval
    kind = pattern.type
    if kind is PatternType.DAILY:
        day = day0
        while True:
            yield day
            day += dt.timedelta(days=step)
    if kind is PatternType.WEEKLY:
        wanted = sorted(DAYS.index(d) for d in pattern.days_of_week)
        week_start = DAYS.index(pattern.first_day_of_week)
        monday_offset = (day0.weekday() - week_start) % 7
        week = day0 - dt.timedelta(days=monday_offset)
        while True:
            for offset in sorted((w - week_start) % 7 for w in wanted):
                day = week + dt.timedelta(days=offset)
                if day >= day0:
                    yield day
            week += dt.timedelta(weeks=step)
    yearly = kind in (PatternType.ABSOLUTE_YEARLY, PatternType.RELATIVE_YEARLY)
    year, month = day0.year, pattern.month if yearly else day0.month
    months = 12 * step if yearly else step
    while True:
        if kind in (PatternType.ABSOLUTE_MONTHLY, PatternType.ABSOLUTE_YEARLY):
            day = dt.date(year, month, min(pattern.day_of_month, _month_days(year, month)))
        else:
            day = _relative(year, month, pattern)
        if day >= day0:
            yield day
        month += months
        year, month = year + (month - 1) // 12, (month - 1) % 12 + 1


def _same(a: dt.datetime | dt.date, b: dt.datetime | dt.date) -> bool:
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        if (a.tzinfo is None) != (b.tzinfo is None):
            a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
        return a == b
    return _day_of(a) == _day_of(b) and not (isinstance(a, dt.datetime)
                                             or isinstance(b, dt.datetime))


def instance_index(rule: str, start: dt.datetime | dt.date, zone: str,
                   original: dt.datetime | dt.date, *, limit: int = 5000) -> int | None:
    """The 1-based position of the occurrence that starts at ``original`` (EWS
    ``InstanceIndex``), or None when the series has no such occurrence."""
    target = local_start(original, zone)
    for position, moment in enumerate(starts(rule, start, zone), start=1):
        if _same(moment, target):
            return position
        if position >= limit or _later(moment, target):
            return None
    return None


def _later(a: dt.datetime | dt.date, b: dt.datetime | dt.date) -> bool:
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        if (a.tzinfo is None) != (b.tzinfo is None):
            return a.replace(tzinfo=None) > b.replace(tzinfo=None)
        return a > b
    return _day_of(a) > _day_of(b)
