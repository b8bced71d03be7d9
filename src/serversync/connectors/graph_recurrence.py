"""Recurring events and tasks in Microsoft Graph's shapes (pure functions, no I/O).

Graph v1.0 keeps a series as a ``seriesMaster`` event with a ``patternedRecurrence``
(https://learn.microsoft.com/en-us/graph/api/resources/patternedrecurrence) and lists its
occurrences and changed occurrences ("exceptions") with ``GET /events/{id}/instances``
(https://learn.microsoft.com/en-us/graph/api/event-list-instances). It has no list of
cancelled occurrences in v1.0 (``cancelledOccurrences`` is beta only), so a cancellation is an
occurrence the pattern promises that ``instances`` does not return. This module turns those
shapes into an `Appointment`'s ``rrule`` / ``cancelled_occurrences`` / ``occurrences`` and
back, through `core.recurrence` (which refuses what Exchange cannot say):

* **Time zones.** Graph names zones the Windows way (``W. Europe Standard Time``); the model
  keeps IANA names. The mapping is Unicode CLDR's windowsZones table as exchangelib ships it
  (`exchangelib.winzone`), the same one the EWS connector's exchangelib uses, so both Exchange
  connectors agree. Several IANA zones share one Windows zone: ``Europe/Madrid`` is written as
  ``Romance Standard Time`` and read back as ``Europe/Paris`` (same rules, other name).
* **The instances window.** A series that ends within `HORIZON` of today (or of its start,
  when that is later) is read whole; for a longer or endless one, cancellations are known up
  to that horizon and later ones are not reported (nor written: `check_occurrences` refuses
  them). The window reaches `PAD` further on both sides so that an occurrence moved a little
  before the series or past its end is still seen.
* **Exactness.** When the instances Graph lists disagree with our expansion of the pattern
  (an original start the pattern does not produce), the series is refused, not guessed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from exchangelib.winzone import IANA_TO_MS_TIMEZONE_MAP, MS_TIMEZONE_TO_IANA_MAP

from serversync.core.act import Appointment, Moment, Occurrence
from serversync.core.errors import ItemError
from serversync.core.recurrence import (
    DAYS,
    Pattern,
    PatternType,
    Unrepresentable,
    WeekIndex,
    from_rrule,
    local_start,
    starts,
    to_rrule,
)

HORIZON = dt.timedelta(days=730)  # how far ahead cancellations of a long series are read
PAD = dt.timedelta(days=366)  # margin around a series for occurrences moved outside it
INSTANCE_FIELDS = "id,type,originalStart,start,end,subject,location,body,isCancelled"
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "tzone://Microsoft/Utc"})


# ---------------------------------------------------------------- time zones

def iana_zone(name: str | None) -> str | None:
    """The IANA name of a Graph time zone name (Windows or IANA), None when unknown."""
    if not name:
        return None
    if name in _UTC_NAMES:
        return "UTC"
    mapped = MS_TIMEZONE_TO_IANA_MAP.get(name)
    if mapped:
        return "UTC" if mapped in _UTC_NAMES else mapped
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None  # "tzone://Microsoft/Custom" (legacy Outlook custom zone) and the like
    return name


def windows_zone(name: str) -> str | None:
    """The Windows name Exchange stores for an IANA zone, None when CLDR has none."""
    if name in _UTC_NAMES:
        return "UTC"
    entry = IANA_TO_MS_TIMEZONE_MAP.get(name)
    return entry[0] if entry else None


def zone_info(name: str) -> dt.tzinfo:
    return dt.UTC if name == "UTC" else ZoneInfo(name)


def when(value: Mapping[str, Any] | None) -> dt.datetime | None:
    """A Graph ``dateTimeTimeZone`` (or a ``…Z`` timestamp) as an aware UTC datetime."""
    if not value or not value.get("dateTime"):
        return None
    text = str(value["dateTime"])
    utc = text.endswith("Z")
    text = text.rstrip("Z")
    if "." in text:
        head, _, fraction = text.partition(".")
        text = f"{head}.{fraction[:6]}"
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        return moment.astimezone(dt.UTC)
    name = "UTC" if utc else str(value.get("timeZone") or "UTC")
    zone = iana_zone(name)
    if zone is None:
        raise ItemError(f"time zone {name!r} has no IANA equivalent", code="bad-item")
    return moment.replace(tzinfo=zone_info(zone)).astimezone(dt.UTC)


def instant(text: str) -> dt.datetime:
    """A DateTimeOffset such as ``originalStart`` (``2017-09-04T19:00:00Z``) in UTC."""
    parsed = when({"dateTime": text, "timeZone": "UTC"})
    assert parsed is not None
    return parsed


def zoned(moment: Moment, zone: str, windows: str) -> dict[str, str]:
    """``moment`` as a ``dateTimeTimeZone`` in ``zone`` (IANA), named ``windows``."""
    if not isinstance(moment, dt.datetime):
        return {"dateTime": f"{moment.isoformat()}T00:00:00", "timeZone": windows}
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    local = moment.astimezone(zone_info(zone))
    return {"dateTime": local.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": windows}


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- patternedRecurrence

_RANGES = {"enddate": "endDate", "noend": "noEnd", "numbered": "numbered"}


def pattern_of(recurrence: Mapping[str, Any]) -> Pattern:
    """A Graph ``patternedRecurrence`` as a `Pattern` (only the fields its type uses)."""
    pattern = recurrence.get("pattern") or {}
    span = recurrence.get("range") or {}
    try:
        kind = PatternType(str(pattern.get("type")))
        days = tuple(sorted({str(d).lower() for d in pattern.get("daysOfWeek") or []},
                            key=DAYS.index))
        first_day = str(pattern.get("firstDayOfWeek") or "sunday").lower()
        DAYS.index(first_day)
        index = WeekIndex(str(pattern.get("index") or "first").lower())
        interval = int(pattern.get("interval") or 1)
        start = dt.date.fromisoformat(str(span["startDate"]))
        range_type = _RANGES[str(span.get("type", "")).lower()]
    except (ValueError, KeyError, TypeError):
        raise Unrepresentable(f"unreadable Graph recurrence {dict(recurrence)!r}") from None
    end = count = None
    if range_type == "endDate":
        end = dt.date.fromisoformat(str(span.get("endDate")))
    elif range_type == "numbered":
        count = int(span.get("numberOfOccurrences") or 0)
        if count < 1:
            raise Unrepresentable(f"Graph recurrence {dict(recurrence)!r}: a numbered range "
                                  "needs numberOfOccurrences")
    weekly = kind is PatternType.WEEKLY
    relative = kind in (PatternType.RELATIVE_MONTHLY, PatternType.RELATIVE_YEARLY)
    absolute = kind in (PatternType.ABSOLUTE_MONTHLY, PatternType.ABSOLUTE_YEARLY)
    yearly = kind in (PatternType.ABSOLUTE_YEARLY, PatternType.RELATIVE_YEARLY)
    if (weekly or relative) and not days:
        raise Unrepresentable(f"Graph recurrence {dict(recurrence)!r}: no daysOfWeek")
    return Pattern(
        kind, start=start, interval=interval, days_of_week=days if weekly or relative else (),
        day_of_month=int(pattern.get("dayOfMonth") or 0) if absolute else 0,
        month=int(pattern.get("month") or 0) if yearly else 0,
        index=index if relative else WeekIndex.FIRST,
        first_day_of_week=first_day if weekly else "monday", end=end, count=count)


def recurrence_json(pattern: Pattern, zone: str | None) -> dict[str, Any]:
    """The ``patternedRecurrence`` to write: only the properties each type requires
    (recurrencePattern: "Any property that you include that does not have a supported value
    would result in an error")."""
    out: dict[str, Any] = {"type": pattern.type.value, "interval": pattern.interval}
    if pattern.type in (PatternType.WEEKLY, PatternType.RELATIVE_MONTHLY,
                        PatternType.RELATIVE_YEARLY):
        out["daysOfWeek"] = list(pattern.days_of_week)
    if pattern.type is PatternType.WEEKLY:
        out["firstDayOfWeek"] = pattern.first_day_of_week
    if pattern.type in (PatternType.RELATIVE_MONTHLY, PatternType.RELATIVE_YEARLY):
        out["index"] = pattern.index.value
    if pattern.type in (PatternType.ABSOLUTE_MONTHLY, PatternType.ABSOLUTE_YEARLY):
        out["dayOfMonth"] = pattern.day_of_month
    if pattern.type in (PatternType.ABSOLUTE_YEARLY, PatternType.RELATIVE_YEARLY):
        out["month"] = pattern.month
    span: dict[str, Any] = {"type": "noEnd", "startDate": pattern.start.isoformat()}
    if pattern.count is not None:
        span = {"type": "numbered", "startDate": pattern.start.isoformat(),
                "numberOfOccurrences": pattern.count}
    elif pattern.end is not None:
        span = {"type": "endDate", "startDate": pattern.start.isoformat(),
                "endDate": pattern.end.isoformat()}
    if zone is not None:
        span["recurrenceTimeZone"] = zone
    return {"pattern": out, "range": span}


# ---------------------------------------------------------------- a series and its window

@dataclass(frozen=True, slots=True)
class Series:
    """One recurring series: its rule, zone, first occurrence and length."""

    rrule: str
    zone: str  # IANA
    start: Moment  # the first occurrence: wall-clock in ``zone`` (aware), or a date
    duration: dt.timedelta
    all_day: bool

    @classmethod
    def of(cls, record: Appointment) -> Series:
        start = local_start(record.start, record.timezone)
        if isinstance(start, dt.datetime) and start.tzinfo is None:
            start = start.replace(tzinfo=zone_info(record.timezone))
        return cls(record.rrule, record.timezone, start, _length(record.start, record.end),
                   not isinstance(record.start, dt.datetime))

    def key(self, moment: Moment) -> Moment:
        """How an occurrence is identified: its original start in UTC, or its day."""
        if self.all_day:
            if isinstance(moment, dt.datetime):
                return (moment.astimezone(zone_info(self.zone)) if moment.tzinfo
                        else moment).date()
            return moment
        if not isinstance(moment, dt.datetime):
            raise ItemError(f"the series is timed, but {moment.isoformat()} is a date")
        return moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

    def instant(self, moment: Moment) -> dt.datetime:
        """A comparable UTC instant (a day starts at midnight in the series' zone)."""
        if isinstance(moment, dt.datetime):
            return moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        midnight = dt.datetime.combine(moment, dt.time(), zone_info(self.zone))
        return midnight.astimezone(dt.UTC)

    def local(self, key: Moment) -> Moment:
        """A key as the model keeps it: wall-clock in the series' zone, or the day."""
        if isinstance(key, dt.datetime):
            return key.astimezone(zone_info(self.zone))
        return key

    def occurrences(self) -> Iterator[Moment]:
        """The keys of every occurrence the pattern produces, in order (maybe endless)."""
        for moment in starts(self.rrule, self.start, self.zone):
            yield self.key(moment)


def _length(start: Moment, end: Moment) -> dt.timedelta:
    if isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
        return end - start
    day = start.date() if isinstance(start, dt.datetime) else start
    last = end.date() if isinstance(end, dt.datetime) else end
    return dt.timedelta(days=(last - day).days)


@dataclass(frozen=True, slots=True)
class Window:
    """Where a series' instances are looked for, and up to when they are complete."""

    start: dt.datetime
    end: dt.datetime
    known_until: dt.datetime | None  # None: the series ends first, it is read whole
    keys: tuple[Moment, ...]  # the occurrences the pattern promises before known_until


def window(series: Series, now: dt.datetime) -> Window:
    first = series.instant(series.start)
    horizon = max(now, first) + HORIZON
    keys: list[Moment] = []
    for key in series.occurrences():
        if series.instant(key) >= horizon:
            return Window(first - PAD, horizon + PAD, horizon, tuple(keys))
        keys.append(key)
    last = series.instant(keys[-1]) if keys else first
    return Window(first - PAD, last + series.duration + PAD, None, tuple(keys))


# ---------------------------------------------------------------- reading a series

def series_of(item: Mapping[str, Any], zone: str) -> tuple[Series, Moment, Moment]:
    """The series of a ``seriesMaster`` and the start/end of its first occurrence."""
    start, end = when(item.get("start")), when(item.get("end"))
    if start is None or end is None:
        raise ItemError("the series master has no start or end", code="bad-item")
    tz = zone_info(zone)
    first: Moment = start.astimezone(tz)
    last: Moment = end.astimezone(tz)
    all_day = bool(item.get("isAllDay"))
    if all_day:
        first, last = start.astimezone(tz).date(), end.astimezone(tz).date()
    pattern = pattern_of(item.get("recurrence") or {})
    rrule = to_rrule(pattern, first, zone)
    # Exchange's first occurrence is the pattern's first day on or after the range start; the
    # model's DTSTART must be that occurrence (RFC 5545 counts DTSTART as one).
    opening = next(starts(rrule, first, zone), None)
    if opening is None:
        raise ItemError(f"the series ({rrule}) has no occurrence", code="bad-item")
    length = _length(first, last)
    return (Series(rrule, zone, opening, length, all_day), opening,
            _moved(opening, length, zone))


def _day(moment: Moment) -> dt.date:
    return moment.date() if isinstance(moment, dt.datetime) else moment


def _moved(moment: Moment, delta: dt.timedelta, zone: str) -> Moment:
    if isinstance(moment, dt.datetime):
        return (moment.astimezone(dt.UTC) + delta).astimezone(zone_info(zone))
    return moment + dt.timedelta(days=delta.days)


@dataclass(frozen=True, slots=True)
class Values:
    """What an occurrence shows: the fields an `Occurrence` carries."""

    start: Moment
    end: Moment
    subject: str
    location: str
    body: str


def default_values(series: Series, key: Moment, subject: str, location: str,
                   body: str) -> Values:
    """An unchanged occurrence: the series' own values at its original start."""
    start = series.local(key)
    return Values(start, _moved(start, series.duration, series.zone), subject, location, body)


def instance_values(series: Series, instance: Mapping[str, Any]) -> Values:
    start, end = when(instance.get("start")), when(instance.get("end"))
    if start is None or end is None:
        raise ItemError("an occurrence has no start or end", code="bad-item")
    if series.all_day:
        tz = zone_info(series.zone)
        return Values(start.astimezone(tz).date(), end.astimezone(tz).date(),
                      *_texts(instance))
    return Values(series.local(start), series.local(end), *_texts(instance))


def _texts(item: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(item.get("subject") or ""),
            str((item.get("location") or {}).get("displayName") or ""),
            str((item.get("body") or {}).get("content") or ""))


def same_values(series: Series, a: Values, b: Values) -> bool:
    return (series.instant(a.start), series.instant(a.end), a.subject, a.location, a.body) == (
        series.instant(b.start), series.instant(b.end), b.subject, b.location, b.body)


def read_instances(series: Series, master: Values, instances: Sequence[Mapping[str, Any]],
                   win: Window) -> tuple[tuple[Moment, ...], tuple[Occurrence, ...],
                                         dict[Moment, Mapping[str, Any]]]:
    """Cancelled occurrences, changed occurrences and the instances by key.

    ``master`` holds the series' subject, location and body (its start/end are unused). An
    exception that shows exactly what the series would is not a changed occurrence; an
    instance Graph marks ``isCancelled`` (an attendee's copy of a cancelled occurrence)
    counts as cancelled.
    """
    promised = set(win.keys)
    seen: set[Moment] = set()
    changed: list[Occurrence] = []
    by_key: dict[Moment, Mapping[str, Any]] = {}
    for instance in instances:
        if not instance.get("originalStart"):
            raise ItemError("an occurrence has no originalStart", code="bad-item")
        key = series.key(instant(str(instance["originalStart"])))
        if win.known_until is not None and series.instant(key) >= win.known_until:
            continue  # past the horizon: not reported (nor written)
        if key not in promised:
            raise ItemError(
                f"Graph lists an occurrence originally at {instance['originalStart']} that "
                f"RRULE {series.rrule} in {series.zone} does not produce: the series cannot "
                "be read exactly", code="unsupported-recurrence")
        by_key[key] = instance
        if instance.get("isCancelled"):
            continue
        seen.add(key)
        if instance.get("type") != "exception":
            continue
        values = instance_values(series, instance)
        plain = default_values(series, key, master.subject, master.location, master.body)
        if not same_values(series, values, plain):
            changed.append(Occurrence(series.local(key), values.start, values.end,
                                      values.subject, values.location, values.body))
    cancelled = tuple(series.local(k) for k in win.keys if k not in seen)
    return cancelled, tuple(changed), by_key


# ---------------------------------------------------------------- checking a series to write

def check_occurrences(record: Appointment, series: Series, win: Window) -> None:
    """Refuse (`ItemError`) what Exchange cannot store or we could not read back exactly."""
    uid = record.uid
    promised = win.keys
    index = {k: i for i, k in enumerate(promised)}
    seen: set[Moment] = set()
    for moment in [*record.cancelled_occurrences, *(o.recurrence_id for o in record.occurrences)]:
        key = series.key(moment)
        if key in seen:
            raise ItemError(f"appointment {uid}: the occurrence at {_text(moment)} is "
                            "cancelled or changed twice", code="bad-item")
        seen.add(key)
        if key in index:
            continue
        if win.known_until is not None and series.instant(key) >= win.known_until:
            raise ItemError(
                f"appointment {uid}: the occurrence at {_text(moment)} is cancelled or changed "
                f"more than {HORIZON.days} days ahead; Graph v1.0 lists no cancelled "
                "occurrences, so it could not be read back (change it later)",
                code="unsupported-recurrence")
        raise ItemError(f"appointment {uid}: {_text(moment)} is not an occurrence of RRULE "
                        f"{record.rrule} in {record.timezone}", code="unsupported-recurrence")
    for occurrence in record.occurrences:
        key = series.key(occurrence.recurrence_id)
        position = index[key]
        if type(occurrence.start) is not type(series.start) or \
                type(occurrence.end) is not type(series.start):
            raise ItemError(f"appointment {uid}: the occurrence at {_text(key)} mixes dates "
                            "and times", code="bad-item")
        moved = series.instant(occurrence.start)
        if series.instant(occurrence.end) < moved:
            raise ItemError(f"appointment {uid}: the occurrence at {_text(key)} ends before "
                            "it starts", code="bad-item")
        if not win.start <= moved < win.end:
            raise ItemError(f"appointment {uid}: the occurrence at {_text(key)} is moved "
                            "too far from its series to be read back", code="unsupported-item")
        day = _day(series.local(series.key(occurrence.start)))
        before = _day(series.local(promised[position - 1])) if position > 0 else None
        after = (_day(series.local(promised[position + 1]))
                 if position + 1 < len(promised) else None)
        if (before is not None and day <= before) or (after is not None and day >= after):
            raise ItemError(
                f"appointment {uid}: Exchange cannot move the occurrence at {_text(key)} to "
                f"{day.isoformat()}: an occurrence may not share a day with, or skip over, "
                "the occurrences next to it", code="unsupported-recurrence")


def _text(moment: Moment) -> str:
    return moment.isoformat()


def check_start(record: Appointment) -> Pattern:
    """The Exchange pattern of ``record`` (its rule must start on ``record.start``)."""
    pattern = from_rrule(record.rrule, record.start, record.timezone)
    first = next(starts(record.rrule, record.start, record.timezone), None)
    local = local_start(record.start, record.timezone)
    if first is None or first != local:
        raise ItemError(
            f"appointment {record.uid}: the series starts at {_text(local)}, which is not an "
            f"occurrence of RRULE {record.rrule}; Exchange would start it at "
            f"{_text(first) if first is not None else 'no occurrence'}",
            code="unsupported-recurrence")
    return pattern
