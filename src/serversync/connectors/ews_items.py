"""Appointments, contacts and tasks of an on-premises Exchange mailbox as a `protocols.ItemStore`.

Collections are the user's Calendar, Contacts and Tasks folders (EWS distinguished folders).
Items are identified by their EWS ItemId (the href) and ChangeKey (the etag):

* **Changes**: SyncFolderItems with the folder's SyncState as the token, asking for the
  ``Categories`` of each changed item. As the reference does, only items that carry the
  tracking category (``Tracked to serversync``) come from the server to the application;
  every item we create carries it. A first sync, or a SyncState the server dropped, is a
  complete listing.
* **Identity**: the ACT service matches items by UID. Calendar items have a settable ``UID``;
  contacts and tasks carry ours in a named extended property (``PublicStrings``,
  ``serversync-uid``); items without one use their ItemId.
* **Writes**: CreateItem (SaveOnly, ``SendMeetingInvitations=SendToNone`` unless the
  service asks for invitations), UpdateItem with ``ConflictResolution=NeverOverwrite`` and the
  ChangeKey (a stale one raises `PreconditionFailed`), DeleteItem (HardDelete, no
  cancellations). The hash returned is of the record read back through the same mapping.
* **Recurring appointments** (see `core.recurrence` for the rule mapping): a series is its
  *recurring master*; the RRULE becomes the master's ``Recurrence`` (pattern and range) and
  back, its time zone is the master's ``StartTimeZone`` (a Windows zone, read back as the IANA
  name the CLDR table gives for it), EXDATEs are the ``DeletedOccurrences`` and changed
  instances the ``ModifiedOccurrences`` (their subject, location and body read with one batched
  GetItem). Occurrences and exceptions are never records of their own. A series is written
  with its start and end in its own zone (wall-clock times stay put across daylight-saving
  changes), then its cancelled and changed occurrences are applied by ``OccurrenceItemId``
  (``DeleteItem``, ``UpdateItem``); an update compares with what the server holds and only
  touches what differs. Anything EWS cannot store — a rule outside Exchange's patterns, a
  yearly rule with an INTERVAL, more than 999 occurrences, a series that does not start on one
  of its occurrences, an instance moved onto or past its neighbour's day (Exchange refuses
  that, ``ErrorOccurrenceCrossingBoundary``) — is refused before any request with an
  `ItemError` naming the rule; nothing is approximated.
* **Recurring tasks**: ``TaskRecurrence`` with the same six patterns ↔ ``Task.rrule``, anchored
  on the due date (or the start date). Regenerating tasks ("repeat 3 days after each
  completion", ``DailyRegeneration`` …) have no iCalendar equivalent and are quarantined.

Not mapped yet: contact name prefixes (EWS keeps them in the read-only CompleteName), phone
kinds other than work/home/cell/fax, attendee responses (EWS returns them; we keep them as
needs-action), and attendees or reminders of single changed occurrences (an exception carries
its own times, subject, location and body only).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exchangelib import CalendarItem, EWSDate, EWSDateTime, EWSTimeZone, ExtendedProperty
from exchangelib import Contact as EwsContact
from exchangelib import Task as EwsTask
from exchangelib import errors as ews_errors
from exchangelib.fields import FieldPath
from exchangelib.indexed_properties import EmailAddress, PhoneNumber, PhysicalAddress
from exchangelib.items import SEND_ONLY_TO_ALL, SEND_TO_NONE
from exchangelib.properties import Attendee as EwsAttendee
from exchangelib.properties import ItemId, OccurrenceItemId
from exchangelib.properties import Mailbox as EwsMailboxAddress
from exchangelib.recurrence import (
    AbsoluteMonthlyPattern,
    AbsoluteYearlyPattern,
    DailyPattern,
    EndDatePattern,
    NoEndPattern,
    NumberedPattern,
    Recurrence,
    Regeneration,
    RelativeMonthlyPattern,
    RelativeYearlyPattern,
    TaskRecurrence,
    WeeklyPattern,
)
from exchangelib.services import SyncFolderItems

from serversync.connectors.ews import ChangeKeyConflict, EwsMailbox, StaleCursor
from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import (
    FetchedItem,
    ItemChanges,
    ItemCollection,
    PreconditionFailed,
    WrittenItem,
)
from serversync.core.act import (
    Appointment,
    AppointmentStatus,
    Attendee,
    AttendeeRole,
    BusyStatus,
    Contact,
    ItemKind,
    Moment,
    Occurrence,
    Phone,
    PostalAddress,
    Record,
    Task,
    TaskStatus,
    content_hash,
)
from serversync.core.errors import ItemError
from serversync.core.model import Profile
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
    tzinfo,
)
from serversync.core.rules import Login

CATEGORY = "Tracked to serversync"
FOLDERS = {ItemKind.APPOINTMENT: "calendar", ItemKind.CONTACT: "contacts", ItemKind.TASK: "tasks"}
_BUSY = {BusyStatus.FREE: "Free", BusyStatus.TENTATIVE: "Tentative", BusyStatus.BUSY: "Busy",
         BusyStatus.OUT_OF_OFFICE: "OOF"}
_TASK_STATUS = {TaskStatus.NOT_STARTED: "NotStarted", TaskStatus.IN_PROGRESS: "InProgress",
                TaskStatus.COMPLETED: "Completed", TaskStatus.CANCELLED: "Deferred"}
_PHONES = {"work": "BusinessPhone", "home": "HomePhone", "cell": "MobilePhone",
           "fax": "BusinessFax"}
_ADDRESSES = {"work": "Business", "home": "Home", "other": "Other"}
_REGISTER = threading.Lock()


class SyncUid(ExtendedProperty):  # type: ignore[misc]
    """Our UID on contacts and tasks (a named MAPI property in the PublicStrings set)."""

    distinguished_property_set_id = "PublicStrings"
    property_name = "serversync-uid"
    property_type = "String"


def _register() -> None:
    """Teach exchangelib the extended property (class-level, once, on first use)."""
    with _REGISTER:
        for model in (EwsContact, EwsTask):
            if "sync_uid" not in {f.name for f in model.FIELDS}:
                model.register("sync_uid", SyncUid)


def _utc(value: Any) -> dt.datetime | dt.date | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return dt.datetime(*value.timetuple()[:6], value.microsecond, tzinfo=dt.UTC)
        # EWSDateTime refuses stdlib time zones in astimezone(): go through the timestamp
        return dt.datetime.fromtimestamp(value.timestamp(), dt.UTC)
    if isinstance(value, dt.date):
        return dt.date(value.year, value.month, value.day)
    return None


def _ews_time(value: dt.datetime | dt.date) -> Any:
    if isinstance(value, dt.datetime):
        return EWSDateTime.from_datetime(
            (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC))
    return EWSDate.from_date(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------- recurrence <-> EWS

_WEEK_NUMBER = {WeekIndex.FIRST: 1, WeekIndex.SECOND: 2, WeekIndex.THIRD: 3,
                WeekIndex.FOURTH: 4, WeekIndex.LAST: 5}  # EWS DayOfWeekIndex, 1-based
_DAY_SETS = {DAYS: 8, DAYS[:5]: 9, DAYS[5:]: 10}  # EWS DaysOfWeek Day / Weekday / WeekendDay
_SERIES_TYPES = ("Occurrence", "Exception")  # parts of a series, never records of their own


def _ews_zone(name: str) -> Any:
    """The EWS time zone of an IANA name (Exchange keeps Windows zones)."""
    try:
        return EWSTimeZone("UTC" if name in ("", "Etc/UTC") else name)
    except ews_errors.UnknownTimeZone:
        raise ItemError(f"time zone {name!r} has no Windows time zone Exchange could keep the "
                        "series in", code="unsupported-timezone",
                        fix="use an IANA zone name such as Europe/Berlin") from None


def _iana(zone: Any) -> str:
    """The IANA name Exchange's zone reads back as: through its Windows id (so
    Europe/Amsterdam, kept as "W. Europe Standard Time", comes back as Europe/Berlin)."""
    key = str(EWSTimeZone.from_ms_id(zone.ms_id).key)
    return "UTC" if key in ("UTC", "Etc/UTC") else key


def ews_recurrence(pattern: Pattern, rule: str, *, task: bool = False) -> Any:
    """The exchangelib ``Recurrence`` (``TaskRecurrence`` for tasks) of ``pattern``.

    Raises `Unrepresentable` for what `core.recurrence` allows but EWS does not: yearly
    patterns have no Interval in EWS, intervals are at most 99 (999 days), a numbered range
    at most 999 occurrences.
    """
    kind, interval = pattern.type, pattern.interval
    if kind in (PatternType.ABSOLUTE_YEARLY, PatternType.RELATIVE_YEARLY) and interval != 1:
        raise Unrepresentable(f"RRULE {rule!r}: EWS yearly patterns have no interval (they "
                              f"repeat every year), so INTERVAL={interval} cannot be stored")
    most = 999 if kind is PatternType.DAILY else 99
    if interval > most:
        raise Unrepresentable(f"RRULE {rule!r}: EWS allows an interval of at most {most}")
    days = [DAYS.index(d) + 1 for d in pattern.days_of_week]
    weekday = days[0] if len(days) == 1 else _DAY_SETS.get(pattern.days_of_week, 0)
    ews: Any
    if kind is PatternType.DAILY:
        ews = DailyPattern(interval=interval)
    elif kind is PatternType.WEEKLY:
        ews = WeeklyPattern(interval=interval, weekdays=days,
                            first_day_of_week=DAYS.index(pattern.first_day_of_week) + 1)
    elif kind is PatternType.ABSOLUTE_MONTHLY:
        ews = AbsoluteMonthlyPattern(interval=interval, day_of_month=pattern.day_of_month)
    elif kind is PatternType.RELATIVE_MONTHLY:
        ews = RelativeMonthlyPattern(interval=interval, weekday=weekday,
                                     week_number=_WEEK_NUMBER[pattern.index])
    elif kind is PatternType.ABSOLUTE_YEARLY:
        ews = AbsoluteYearlyPattern(day_of_month=pattern.day_of_month, month=pattern.month)
    else:
        ews = RelativeYearlyPattern(weekday=weekday, week_number=_WEEK_NUMBER[pattern.index],
                                    month=pattern.month)
    first = EWSDate.from_date(pattern.start)
    bounds: Any
    if pattern.count is not None:
        if pattern.count > 999:
            raise Unrepresentable(f"RRULE {rule!r}: EWS counts at most 999 occurrences")
        bounds = NumberedPattern(start=first, number=pattern.count)
    elif pattern.end is not None:
        bounds = EndDatePattern(start=first, end=EWSDate.from_date(pattern.end))
    else:
        bounds = NoEndPattern(start=first)
    return (TaskRecurrence if task else Recurrence)(pattern=ews, boundary=bounds)


def our_pattern(recurrence: Any, what: str) -> Pattern:
    """The `Pattern` of an exchangelib (Task)Recurrence read from the server."""
    ews, bounds = recurrence.pattern, recurrence.boundary
    if isinstance(ews, Regeneration):
        unit = {"Daily": "day", "Weekly": "week", "Monthly": "month", "Yearly": "year"}[
            type(ews).__name__.removesuffix("Regeneration")]
        raise ItemError(f"{what} regenerates {ews.interval} {unit}(s) after each completion "
                        f"({type(ews).__name__}); iCalendar has no rule that depends on when "
                        "a task is completed, so it is not synced",
                        code="unsupported-recurrence",
                        fix="in Outlook, make it recur on a fixed schedule (\"Recur every\" "
                            "instead of \"Regenerate new task\")")
    if ews is None or bounds is None:
        raise ItemError(f"{what}: the recurrence has no pattern or range", code="bad-item")
    start = _day(bounds.start)
    base = Pattern(PatternType.DAILY, start=start, first_day_of_week="monday",
                   end=_day(bounds.end) if isinstance(bounds, EndDatePattern) else None,
                   count=int(bounds.number) if isinstance(bounds, NumberedPattern) else None)
    if isinstance(ews, DailyPattern):
        return dataclasses.replace(base, interval=int(ews.interval))
    if isinstance(ews, WeeklyPattern):
        return dataclasses.replace(
            base, type=PatternType.WEEKLY, interval=int(ews.interval),
            days_of_week=tuple(DAYS[d - 1] for d in sorted(set(ews.weekdays))),
            first_day_of_week=DAYS[int(ews.first_day_of_week or 1) - 1])
    if isinstance(ews, AbsoluteMonthlyPattern | AbsoluteYearlyPattern):
        yearly = isinstance(ews, AbsoluteYearlyPattern)
        return dataclasses.replace(
            base, type=PatternType.ABSOLUTE_YEARLY if yearly else PatternType.ABSOLUTE_MONTHLY,
            interval=1 if yearly else int(ews.interval), day_of_month=int(ews.day_of_month),
            month=int(ews.month) if yearly else 0)
    if isinstance(ews, RelativeMonthlyPattern | RelativeYearlyPattern):
        yearly = isinstance(ews, RelativeYearlyPattern)
        code = int(ews.weekday)
        days = (DAYS[code - 1],) if code <= 7 else next(k for k, v in _DAY_SETS.items()
                                                       if v == code)
        index = {v: k for k, v in _WEEK_NUMBER.items()}[int(ews.week_number)]
        return dataclasses.replace(
            base, type=PatternType.RELATIVE_YEARLY if yearly else PatternType.RELATIVE_MONTHLY,
            interval=1 if yearly else int(ews.interval), days_of_week=days, index=index,
            month=int(ews.month) if yearly else 0)
    raise ItemError(f"{what}: unknown recurrence pattern {type(ews).__name__}", code="bad-item")


def _day(value: Any) -> dt.date:
    """A range's StartDate/EndDate (exchangelib gives dates, or datetimes for some servers)."""
    return dt.date(value.year, value.month, value.day)


def _as_read(value: Moment, zone: str) -> Moment:
    """A recurrence id as the server gives it back: an instant (floating times taken in the
    series' zone), or a date for all-day series."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=tzinfo(zone))
        return aware.astimezone(dt.UTC)
    return value


def _local_day(value: Moment, zone: str) -> dt.date:
    moment = local_start(_as_read(value, zone), zone)
    return moment.date() if isinstance(moment, dt.datetime) else moment


def _same(a: Moment, b: Moment, zone: str) -> bool:
    if isinstance(a, dt.datetime) != isinstance(b, dt.datetime):
        return False
    return _as_read(a, zone) == _as_read(b, zone)


@dataclass(frozen=True, slots=True)
class SeriesPlan:
    """A recurring appointment checked against what EWS can store, before any request:
    its Recurrence, the zone it reads back in, and its cancelled and changed occurrences by
    1-based instance index (EWS ``InstanceIndex``; deleted occurrences keep their index)."""

    recurrence: Any
    zone: str
    cancelled: dict[int, Moment]
    changed: dict[int, Occurrence]
    originals: dict[int, Moment]  # original starts of the changed ones and their neighbours

    def update_order(self) -> list[int]:
        """Changed occurrences in an order where none crosses a neighbour on the way:
        those moving earlier from the first, then the others from the last."""
        def earlier(i: int) -> bool:
            occurrence = self.changed[i]
            return _as_read(occurrence.start, self.zone) < _as_read(self.originals[i],
                                                                    self.zone)
        ahead = sorted(i for i in self.changed if earlier(i))
        behind = sorted((i for i in self.changed if not earlier(i)), reverse=True)
        return ahead + behind


def plan_series(record: Appointment) -> SeriesPlan:
    """Check ``record``'s series against EWS and index its exceptions (raises `ItemError`)."""
    rule, zone = record.rrule, record.timezone or "UTC"
    what = f"appointment {record.subject!r} ({record.uid})"
    ews_zone = _ews_zone(zone)
    recurrence = ews_recurrence(from_rrule(rule, record.start, zone), rule)
    named = (*record.cancelled_occurrences, *(o.recurrence_id for o in record.occurrences))
    pending = {_as_read(m, zone): m for m in named}
    if len(pending) != len(named):
        raise ItemError(f"{what}: an occurrence is cancelled or changed twice", code="bad-item")
    indexes: dict[Moment, int] = {}
    originals: dict[int, Moment] = {}
    expansion = starts(rule, record.start, zone)
    for position, moment in enumerate(expansion, start=1):
        originals[position] = moment
        if position == 1 and not _same(moment, local_start(record.start, zone), zone):
            break
        found = pending.pop(_as_read(moment, zone), None)
        if found is not None:
            indexes[found] = position
        if not pending:
            following = next(expansion, None)  # the last one's next neighbour
            if following is not None:
                originals[position + 1] = following
            break
        if position >= 5000:
            break
    if not originals or not _same(originals[1], local_start(record.start, zone), zone):
        raise Unrepresentable(f"{what} starts at {record.start}, which is not an occurrence of "
                              f"RRULE {rule!r}; Exchange would move the series to its first "
                              "occurrence")
    if pending:
        missing = ", ".join(str(m) for m in pending.values())
        raise ItemError(f"{what}: {missing} is not an occurrence of RRULE {rule!r} (within its "
                        "first 5000)", code="bad-item",
                        fix="give EXDATE and RECURRENCE-ID the original start of an occurrence")
    cancelled = {indexes[m]: m for m in record.cancelled_occurrences}
    changed = {indexes[o.recurrence_id]: o for o in record.occurrences}
    # the neighbours' days, for Exchange's rule that an occurrence may not be moved to or
    # past the day of the previous or next one (deleted ones included)
    for index, occurrence in changed.items():
        day = _local_day(occurrence.start, zone)
        for near in (index - 1, index + 1):
            if near not in originals:
                continue
            other = changed[near].start if near in changed else originals[near]
            near_day = _local_day(other, zone)
            if (near < index and day <= near_day) or (near > index and day >= near_day):
                side = "previous" if near < index else "next"
                raise ItemError(
                    f"{what}: the occurrence of {occurrence.recurrence_id} moved to "
                    f"{occurrence.start} reaches the day of the {side} occurrence; Exchange "
                    "refuses that (ErrorOccurrenceCrossingBoundary)",
                    code="unsupported-recurrence",
                    fix="move it to a day between its neighbours, or cancel it and add a "
                        "separate appointment")
    return SeriesPlan(recurrence, _iana(ews_zone), cancelled, changed,
                      {i: originals[i] for i in changed})


# ---------------------------------------------------------------- records <-> exchangelib

def is_series_part(item: Any) -> bool:
    """An occurrence or exception of a series: part of its master's record, never its own."""
    return isinstance(item, CalendarItem) and item.type in _SERIES_TYPES


def to_record(item: Any, exceptions: Mapping[str, Any] | None = None) -> Record:
    """The record of an exchangelib item; ``exceptions`` holds the fetched exceptions of a
    recurring master by their ItemId."""
    if isinstance(item, CalendarItem):
        return _appointment(item, exceptions or {})
    if isinstance(item, EwsContact):
        return Contact(
            uid=_text(getattr(item, "sync_uid", None)) or _text(item.id),
            full_name=_text(item.display_name), given_name=_text(item.given_name),
            family_name=_text(item.surname), middle_name=_text(item.middle_name),
            suffix=_text(item.generation), organization=_text(item.company_name),
            job_title=_text(item.job_title),
            emails=tuple(_text(e.email).lower() for e in item.email_addresses or [] if e.email),
            phones=tuple(Phone({v: k for k, v in _PHONES.items()}.get(p.label, "other"),
                               _text(p.phone_number))
                         for p in item.phone_numbers or [] if p.phone_number),
            addresses=tuple(PostalAddress({v: k for k, v in _ADDRESSES.items()}[a.label],
                                          _text(a.street), _text(a.city), _text(a.state),
                                          _text(a.zipcode), _text(a.country))
                            for a in item.physical_addresses or []),
            birthday=_utc(item.birthday) if item.birthday else None,
            notes=_text(item.body))
    if isinstance(item, EwsTask):
        status = {v: k for k, v in _TASK_STATUS.items()}.get(_text(item.status),
                                                             TaskStatus.NOT_STARTED)
        uid = _text(getattr(item, "sync_uid", None)) or _text(item.id)
        due, start = _utc(item.due_date), _utc(item.start_date)
        rule = ""
        if item.recurrence is not None:
            pattern = our_pattern(item.recurrence, f"task {_text(item.subject)!r} ({uid})")
            rule = to_rrule(pattern, due or start or pattern.start)
        return Task(
            uid=uid, subject=_text(item.subject), due=due, start=start, status=status,
            percent_complete=int(item.percent_complete or 0),
            priority={"High": 1, "Low": 9}.get(_text(item.importance), 5),
            completed_at=_utc(item.complete_date)  # type: ignore[arg-type]
            if isinstance(item.complete_date, dt.datetime) else None,
            body=_text(item.body), rrule=rule)
    raise ItemError(f"unexpected EWS item {type(item).__name__}", code="bad-item")


def _appointment(item: Any, exceptions: Mapping[str, Any]) -> Appointment:
    if is_series_part(item):
        raise ItemError("an occurrence of a series is not an appointment of its own",
                        code="bad-item")
    start, end = _utc(item.start), _utc(item.end)
    if start is None or end is None:
        raise ItemError("the appointment has no start or end", code="bad-item")
    attendees = tuple(
        Attendee(address=_text(a.mailbox.email_address).lower(),
                 name=_text(a.mailbox.name), role=role)
        for field, role in (("required_attendees", AttendeeRole.REQUIRED),
                            ("optional_attendees", AttendeeRole.OPTIONAL),
                            ("resources", AttendeeRole.RESOURCE))
        for a in getattr(item, field) or [] if a.mailbox is not None)
    uid = _text(item.uid) or _text(item.id)
    appointment = Appointment(
        uid=uid, subject=_text(item.subject),
        start=start, end=end, all_day=bool(item.is_all_day),
        location=_text(item.location),
        organizer=_text(item.organizer.email_address if item.organizer else "").lower(),
        attendees=attendees,
        reminder_minutes=item.reminder_minutes_before_start if item.reminder_is_set
        else None,
        busy={v: k for k, v in _BUSY.items()}.get(_text(item.legacy_free_busy_status),
                                                  BusyStatus.BUSY),
        status=AppointmentStatus.CANCELLED if item.is_cancelled else AppointmentStatus.OPEN,
        body=_text(item.body))
    if item.recurrence is None:
        return appointment  # single appointments keep their UTC times and zone, as before
    what = f"appointment {_text(item.subject)!r} ({uid})"
    zone = _iana(item._start_timezone) if item._start_timezone is not None else "UTC"
    pattern = our_pattern(item.recurrence, what)
    rule = to_rrule(pattern, start, zone)
    first = next(starts(rule, start, zone), None)
    if first is None or not _same(first, local_start(start, zone), zone):
        raise ItemError(f"{what}: the series starts at {start}, which is not an occurrence of "
                        f"its pattern (RRULE {rule!r})", code="bad-item")

    def moment(value: Any) -> Moment:
        instant = _utc(value)
        assert instant is not None
        if item.is_all_day and isinstance(instant, dt.datetime):
            return instant.astimezone(tzinfo(zone)).date()
        return instant

    occurrences = []
    for changed in item.modified_occurrences or []:
        got = exceptions.get(changed.id)
        if got is None or changed.original_start is None:
            raise ItemError(f"{what}: the changed occurrence of {changed.original_start} could "
                            "not be read", code="bad-item")
        occurrences.append(Occurrence(
            recurrence_id=moment(changed.original_start), start=moment(got.start),
            end=moment(got.end), subject=_text(got.subject), location=_text(got.location),
            body=_text(got.body)))
    return dataclasses.replace(
        appointment, timezone=zone, rrule=rule,
        cancelled_occurrences=tuple(moment(d.start) for d in item.deleted_occurrences or []),
        occurrences=tuple(occurrences))


def _zoned(value: Moment, zone: Any) -> Any:
    """A start or end in the series' zone (EWS keeps the wall-clock time there)."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=zone)
        local = aware.astimezone(zone)  # an EWSDateTime already (EWSTimeZone.fromutc)
        return local if isinstance(local, EWSDateTime) else EWSDateTime.from_datetime(local)
    return EWSDate.from_date(value)


def _task_anchor(record: Task) -> dt.date | None:
    anchor = record.due if record.due is not None else record.start
    if anchor is None:
        return None
    return anchor.date() if isinstance(anchor, dt.datetime) else anchor


def from_record(record: Record, *, account: Any, folder: Any, invitations: bool) -> Any:
    """An exchangelib item carrying ``record`` (always with the tracking category)."""
    categories = [CATEGORY]
    if isinstance(record, Appointment):
        if (record.occurrences or record.cancelled_occurrences) and not record.rrule:
            raise ItemError(f"appointment {record.uid}: changed or cancelled occurrences "
                            "without an RRULE", code="bad-item")
        people: dict[AttendeeRole, list[Any]] = {r: [] for r in AttendeeRole}
        for attendee in record.attendees:
            people[attendee.role].append(EwsAttendee(mailbox=EwsMailboxAddress(
                email_address=attendee.address, name=attendee.name or None),
                response_type="Unknown"))
        series: dict[str, Any] = {"start": _ews_time(record.start),
                                  "end": _ews_time(record.end)}
        zone = None
        if record.rrule:
            plan = plan_series(record)
            zone = _ews_zone(record.timezone)
            series = {"start": _zoned(record.start, zone), "end": _zoned(record.end, zone),
                      "recurrence": plan.recurrence}
        item = CalendarItem(
            account=account, folder=folder, uid=record.uid, subject=record.subject,
            is_all_day=record.all_day, location=record.location or None,
            body=record.body or None, categories=categories,
            reminder_is_set=record.reminder_minutes is not None,
            reminder_minutes_before_start=record.reminder_minutes or 0,
            legacy_free_busy_status=_BUSY[record.busy],
            required_attendees=people[AttendeeRole.REQUIRED] if invitations else None,
            optional_attendees=people[AttendeeRole.OPTIONAL] if invitations else None,
            resources=people[AttendeeRole.RESOURCE] if invitations else None, **series)
        if zone is not None:
            item._start_timezone = item._end_timezone = zone
        return item
    _register()
    if isinstance(record, Contact):
        return EwsContact(
            account=account, folder=folder, sync_uid=record.uid,
            display_name=record.full_name or record.given_name or record.uid,
            given_name=record.given_name or None, surname=record.family_name or None,
            middle_name=record.middle_name or None, generation=record.suffix or None,
            company_name=record.organization or None, job_title=record.job_title or None,
            email_addresses=[EmailAddress(email=e, label=f"EmailAddress{i + 1}")
                             for i, e in enumerate(record.emails[:3])] or None,
            phone_numbers=[PhoneNumber(label=_PHONES[p.kind], phone_number=p.number)
                           for p in record.phones if p.kind in _PHONES] or None,
            physical_addresses=[PhysicalAddress(
                label=_ADDRESSES.get(a.kind, "Other"), street=a.street or None,
                city=a.city or None, state=a.region or None, zipcode=a.postcode or None,
                country=a.country or None) for a in record.addresses] or None,
            birthday=record.birthday, body=record.notes or None, categories=categories)
    if isinstance(record, Task):
        due = record.due.date() if isinstance(record.due, dt.datetime) else record.due
        start = record.start.date() if isinstance(record.start, dt.datetime) else record.start
        recurrence = None
        if record.rrule:
            anchor = _task_anchor(record)
            if anchor is None:
                raise ItemError(f"task {record.uid}: a recurring task needs a due or start "
                                "date to anchor its RRULE", code="bad-item")
            recurrence = ews_recurrence(from_rrule(record.rrule, anchor), record.rrule,
                                        task=True)
            if next(starts(record.rrule, anchor), None) != anchor:
                raise Unrepresentable(f"task {record.uid} is due {anchor}, which is not an "
                                      f"occurrence of RRULE {record.rrule!r}; Exchange would "
                                      "move it to the first occurrence")
        return EwsTask(
            account=account, folder=folder, sync_uid=record.uid, subject=record.subject,
            due_date=due, start_date=start, status=_TASK_STATUS[record.status],
            percent_complete=decimal.Decimal(record.percent_complete),
            importance="High" if 1 <= record.priority <= 4 else "Low"
            if record.priority >= 6 else "Normal",
            body=record.body or None, categories=categories, recurrence=recurrence)
    raise ItemError(f"cannot write {type(record).__name__} items to EWS", code="bad-item")


def read_back(record: Record, invitations: bool) -> Record:
    """The record as the server now holds it (our write, read through our own mapping):
    for a series, also its canonical RRULE, the zone Exchange names and its exceptions."""
    written = to_record(from_record(record, account=None, folder=None, invitations=invitations))
    if not isinstance(record, Appointment) or not record.rrule:
        return written
    assert isinstance(written, Appointment)
    plan = plan_series(record)
    return dataclasses.replace(
        written,
        cancelled_occurrences=tuple(_as_read(m, plan.zone) for m in plan.cancelled.values()),
        occurrences=tuple(_occurrence_read_back(o, plan.zone) for o in plan.changed.values()))


def _occurrence_read_back(occurrence: Occurrence, zone: str) -> Occurrence:
    return dataclasses.replace(
        occurrence, recurrence_id=_as_read(occurrence.recurrence_id, zone),
        start=_as_read(occurrence.start, zone), end=_as_read(occurrence.end, zone))


def raw_of(item: Any) -> bytes:
    """A JSON rendering of the fields we read, kept when an item is quarantined."""
    values = {name: str(getattr(item, name, None)) for name in (
        "id", "changekey", "subject", "start", "end", "uid", "display_name", "due_date",
        "status", "categories", "recurrence")}
    return json.dumps(values, sort_keys=True).encode()


# ---------------------------------------------------------------- the store

class EwsItemStore:
    """`ItemStore` over EWS for one on-premises Exchange mailbox."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions) -> None:
        self.ews = EwsMailbox(profile, login, options)

    async def __aenter__(self) -> EwsItemStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ews.close()

    async def collections(self, kinds: Sequence[ItemKind]) -> dict[ItemKind, ItemCollection]:
        for kind in kinds:
            await self.ews.folder_count(FOLDERS[kind])  # type: ignore[arg-type]
        return {kind: ItemCollection(FOLDERS[kind], frozenset({kind}), FOLDERS[kind])
                for kind in kinds}

    async def changes(self, collection: ItemCollection, token: str | None) -> ItemChanges:
        def work(state: str | None) -> ItemChanges:
            folder = self.ews._folder(collection.href)
            account = self.ews._connect()
            model = folder.supported_item_models[0]
            fields = {FieldPath(field=model.get_field_by_fieldname("categories"))}
            if model is CalendarItem:  # to leave out occurrences and exceptions
                fields.add(FieldPath(field=model.get_field_by_fieldname("type")))
            changed: dict[str, str] = {}
            deleted: list[str] = []
            while True:
                service = SyncFolderItems(account=account)
                for kind, item in service.call(folder=folder, shape="IdOnly",
                                               additional_fields=fields,
                                               sync_state=state, ignore=None,
                                               max_changes_returned=512, sync_scope=None):
                    if isinstance(item, Exception):
                        raise item
                    if kind != "delete" and is_series_part(item):
                        continue  # listed with its master
                    if kind == "delete":
                        changed.pop(item.id, None)
                        deleted.append(item.id)
                    elif kind in ("create", "update"):
                        if CATEGORY in (item.categories or []):
                            changed[item.id] = item.changekey
                        else:
                            changed.pop(item.id, None)  # untracked now: gone for us
                            deleted.append(item.id)
                if service.sync_state == state or service.includes_last_item_in_range:
                    state = service.sync_state
                    break
                state = service.sync_state
            return ItemChanges(state, list(changed.items()),
                               [] if token is None else deleted, complete=token is None)
        try:
            return await self.ews._run(lambda: work(token))
        except StaleCursor:
            return await self.ews._run(lambda: work(None))

    async def get_many(self, collection: ItemCollection,
                       hrefs: Sequence[str]) -> list[FetchedItem]:
        _register()

        def work() -> list[FetchedItem]:
            account = self.ews._connect()
            found = list(zip(hrefs, account.fetch(ids=[(h, None) for h in hrefs]),
                             strict=True))
            exceptions = _exceptions(account, [item for _, item in found])
            out: list[FetchedItem] = []
            for href, item in found:
                if isinstance(item, ews_errors.ErrorItemNotFound):
                    continue  # deleted between listing and reading
                if isinstance(item, Exception):
                    raise item
                if is_series_part(item):
                    continue  # part of its master's record
                try:
                    out.append(FetchedItem(href, item.changekey, raw_of(item),
                                           to_record(item, exceptions)))
                except ItemError as exc:
                    out.append(FetchedItem(href, item.changekey, raw_of(item), None,
                                           exc.message))
            return out
        return await self.ews._run(work)

    async def put(self, collection: ItemCollection, record: Record, *, href: str | None,
                  if_match: str | None, invitations: bool) -> WrittenItem:
        def work() -> WrittenItem:
            account = self.ews._connect()
            folder = self.ews._folder(collection.href)
            expected = read_back(record, invitations)  # refuses what EWS cannot store first
            item = from_record(record, account=account, folder=folder, invitations=invitations)
            invites = SEND_ONLY_TO_ALL if invitations else SEND_TO_NONE
            if isinstance(record, Appointment) and record.rrule:
                href_now, etag = _write_series(account, item, record, expected, href, if_match,
                                               invites)
                return WrittenItem(href_now, etag, content_hash(expected))
            extra: dict[str, Any] = ({"send_meeting_invitations": invites}
                                     if isinstance(item, CalendarItem) else {})
            if href is None:
                item.save(**extra)
            else:
                item._id = ItemId(id=href, changekey=if_match)
                fields = [f.name for f in item.FIELDS if not f.is_read_only
                          and f.name in _UPDATABLE]
                if isinstance(item, EwsTask) or (isinstance(item, CalendarItem)
                                                 and _recurring_on_server(account, href)):
                    fields.append("recurrence")  # none now: the server drops its pattern
                try:
                    item.save(update_fields=fields, conflict_resolution="NeverOverwrite",
                              **({"send_meeting_invitations": invites} if extra else {}))
                except ews_errors.ErrorIrresolvableConflict as exc:
                    raise PreconditionFailed(str(exc)) from None
            return WrittenItem(item.id, item.changekey, content_hash(expected))
        try:
            return await self.ews._run(work)
        except ChangeKeyConflict as exc:
            raise PreconditionFailed(exc.message) from None

    async def delete(self, href: str, *, if_match: str | None) -> None:
        def work() -> None:
            account = self.ews._connect()
            for result in account.bulk_delete(ids=[(href, None)], delete_type="HardDelete",
                                              send_meeting_cancellations=SEND_TO_NONE,
                                              affected_task_occurrences="AllOccurrences"):
                if isinstance(result, Exception) and not isinstance(
                        result, ews_errors.ErrorItemNotFound):
                    raise result
        await self.ews._run(work)


# ---------------------------------------------------------------- series on the server

def _exceptions(account: Any, items: Sequence[Any]) -> dict[str, Any]:
    """The changed occurrences of the recurring masters among ``items``, by ItemId, read
    with one GetItem (exchangelib chunks it) for all of them."""
    wanted = [changed.id for item in items if isinstance(item, CalendarItem)
              for changed in item.modified_occurrences or []]
    if not wanted:
        return {}
    got = account.fetch(ids=[(i, None) for i in wanted])
    return {i: item for i, item in zip(wanted, got, strict=True)
            if not isinstance(item, Exception)}


def _recurring_on_server(account: Any, href: str) -> bool:
    [current] = account.fetch(ids=[(href, None)], only_fields=["type"])
    if isinstance(current, Exception):
        raise current
    return bool(current.type == "RecurringMaster")


@dataclass(frozen=True, slots=True)
class _OnServer:
    """What the server holds of a series: the master's own fields (a hash), its shape, and
    its exceptions by instance index."""

    master: str
    shape: tuple[Any, ...]
    cancelled: frozenset[int]
    changed: dict[int, Occurrence]


def _master_hash(record: Appointment) -> str:
    return content_hash(dataclasses.replace(record, cancelled_occurrences=(), occurrences=()))


def _on_server(account: Any, href: str) -> tuple[Any, _OnServer]:
    [current] = account.fetch(ids=[(href, None)])
    if isinstance(current, Exception):
        raise current
    record = to_record(current, _exceptions(account, [current]))
    assert isinstance(record, Appointment)
    if not record.rrule:
        return current, _OnServer(_master_hash(record), _shape(record), frozenset(), {})
    plan = plan_series(record)
    return current, _OnServer(_master_hash(record), _shape(record), frozenset(plan.cancelled),
                              {i: _occurrence_read_back(o, plan.zone)
                               for i, o in plan.changed.items()})


def _shape(record: Appointment) -> tuple[Any, ...]:
    """What, when it changes, makes a new pattern (Exchange then drops the exceptions)."""
    return (record.rrule, record.timezone, _as_read(record.start, record.timezone),
            _as_read(record.end, record.timezone), record.all_day)


def _write_series(account: Any, item: Any, record: Appointment, wanted: Record,
                  href: str | None, if_match: str | None, invites: str) -> tuple[str, str]:
    """Create or update a recurring master, then make its cancelled and changed occurrences
    what ``record`` says (``wanted`` is how it reads back), touching only what differs:
    the master only when its own fields differ, its pattern only when the series' shape
    changed or an exception must go (Exchange cannot restore one occurrence; setting the
    pattern again starts over). Returns (ItemId, ChangeKey)."""
    plan = plan_series(record)
    assert isinstance(wanted, Appointment)
    held = _OnServer("", (), frozenset(), {})
    touched = False
    if href is None:
        item.save(send_meeting_invitations=invites)
        master = item.id
    else:
        current, held = _on_server(account, href)
        if if_match and current.changekey != if_match:
            raise PreconditionFailed(f"EWS: series {href} changed on the server meanwhile")
        master = href
        new_shape = held.shape != _shape(wanted)
        unwanted = (held.cancelled - set(plan.cancelled)) | (set(held.changed) - set(
            plan.changed)) | (held.cancelled & set(plan.changed))
        fields = [f.name for f in item.FIELDS if not f.is_read_only and f.name in _UPDATABLE
                  and f.name not in ("start", "end")]
        if new_shape or unwanted:
            # a pattern set again: the server starts over without exceptions
            fields += ["start", "end", "recurrence"]
        item._id = ItemId(id=href, changekey=current.changekey)
        if new_shape or unwanted or held.master != _master_hash(wanted):
            touched = True
            try:
                item.save(update_fields=fields, conflict_resolution="NeverOverwrite",
                          send_meeting_invitations=invites)
            except ews_errors.ErrorIrresolvableConflict as exc:
                raise PreconditionFailed(str(exc)) from None
        if new_shape or unwanted:
            _, held = _on_server(account, href)
            left = (held.cancelled - set(plan.cancelled)) | (set(held.changed) - set(
                plan.changed))
            if left:
                raise ItemError(f"appointment {record.uid}: the server kept occurrences "
                                f"{sorted(left)} cancelled or changed after the series' "
                                "pattern was set again", code="series-not-reset",
                                fix="restore those occurrences in Outlook")
    deletes = sorted(set(plan.cancelled) - held.cancelled)
    updates = [i for i in plan.update_order()
               if held.changed.get(i) != _occurrence_read_back(plan.changed[i], plan.zone)]
    touched = touched or bool(deletes or updates)
    if deletes:
        results = account.bulk_delete(
            ids=[OccurrenceItemId(id=master, instance_index=i) for i in deletes],
            delete_type="HardDelete", send_meeting_cancellations=SEND_TO_NONE,
            affected_task_occurrences="AllOccurrences")
        _check(record, "cancel", deletes, results)
    if updates:
        zone = _ews_zone(record.timezone)
        changes = []
        for index in updates:
            occurrence = plan.changed[index]
            part = CalendarItem(account=account, folder=item.folder,
                                _id=OccurrenceItemId(id=master, instance_index=index),
                                start=_zoned(occurrence.start, zone),
                                end=_zoned(occurrence.end, zone), is_all_day=record.all_day,
                                subject=occurrence.subject or None,
                                location=occurrence.location or None,
                                body=occurrence.body or None)
            part._start_timezone = part._end_timezone = zone
            changes.append((part, ["start", "end", "subject", "location", "body"]))
        results = account.bulk_update(items=changes, conflict_resolution="NeverOverwrite",
                                      send_meeting_invitations_or_cancellations=invites)
        _check(record, "change", updates, results)
    if not touched:
        return master, str(item.changekey)  # nothing differed: the ChangeKey we read
    [final] = account.fetch(ids=[(master, None)], only_fields=["type"])
    if isinstance(final, Exception):
        raise final
    return master, str(final.changekey)


def _check(record: Appointment, what: str, indexes: Sequence[int], results: Any) -> None:
    failed = [(i, r) for i, r in zip(indexes, results, strict=True) if isinstance(r, Exception)]
    if failed:
        detail = "; ".join(f"occurrence {i}: {type(r).__name__}: {r}" for i, r in failed)
        raise ItemError(f"appointment {record.uid}: the server refused to {what} "
                        f"occurrences ({detail})", code="ews-occurrence-refused")


# The fields an update rewrites (everything we map; UID is fixed at creation).
_UPDATABLE = frozenset({
    "subject", "start", "end", "is_all_day", "location", "body", "categories",
    "reminder_is_set", "reminder_minutes_before_start", "legacy_free_busy_status",
    "required_attendees", "optional_attendees", "resources", "display_name", "given_name",
    "surname", "middle_name", "generation", "company_name", "job_title", "email_addresses",
    "phone_numbers", "physical_addresses", "birthday", "due_date", "start_date", "status",
    "percent_complete", "importance", "sync_uid"})


def store(profile: Profile, login: Login, options: ConnectOptions) -> EwsItemStore:
    """The factory `serversync.wiring` registers for Exchange (EWS) profiles."""
    return EwsItemStore(profile, login, options)
