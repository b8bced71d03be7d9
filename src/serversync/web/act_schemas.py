"""Pydantic models of the REST API's appointments, contacts and tasks (`core.act` records).

Inputs forbid unknown fields and name the bad field in the API's one error format
(``end: is before start``, ``attendees[0].address: 'x' is not an email address``). Dates and
times are ISO 8601: a date alone (``2026-01-05``) is an all-day value; a date-time with an
offset (``2026-01-05T09:00:00+01:00`` or ``...Z``) is an instant. An appointment's date-time
without an offset is read in the appointment's ``timezone`` (an IANA name); a task has no
time zone, so its date-times need an offset. Sub-second precision is dropped, because
iCalendar (RFC 5545) has none and the server's copy must hash equal to ours
(`core.act.content_hash`). RRULE values are checked for shape (RFC 5545 §3.3.10), not
expanded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
import zoneinfo
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
)

from serversync.core import rules
from serversync.core.act import (
    ActFilter,
    Appointment,
    AppointmentScope,
    AppointmentStatus,
    Attendee,
    AttendeeRole,
    BusyStatus,
    ConflictRecord,
    Contact,
    ContactScope,
    Moment,
    Occurrence,
    Phone,
    PostalAddress,
    Record,
    Task,
    TaskScope,
    TaskStatus,
)
from serversync.core.act import Response as Answer
from serversync.core.errors import ConfigError


def _address(value: str) -> str:
    try:
        return rules.check_address("", value)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


def _optional_address(value: str) -> str:
    return _address(value) if value.strip() else ""


def _moment(value: object) -> Moment:
    """A date (all-day) or a date-time; naive date-times are resolved by the model."""
    if isinstance(value, dt.datetime):
        return value.replace(microsecond=0)
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return dt.date.fromisoformat(text)
            return dt.datetime.fromisoformat(text).replace(microsecond=0)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not an ISO 8601 date (2026-01-05) or date-time "
                     "(2026-01-05T09:00:00+01:00)")


def _instant(value: object) -> dt.datetime:
    moment = _moment(value)
    if not isinstance(moment, dt.datetime):
        raise ValueError(f"{value!r} is a date; a date-time is needed here")
    return moment


def _zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin)") \
            from None
    return name


_FREQ = {"SECONDLY", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"}
_RULE_PARTS = {"FREQ", "UNTIL", "COUNT", "INTERVAL", "BYSECOND", "BYMINUTE", "BYHOUR", "BYDAY",
               "BYMONTHDAY", "BYYEARDAY", "BYWEEKNO", "BYMONTH", "BYSETPOS", "WKST"}


def _rrule(value: str) -> str:
    text = value.strip().upper().removeprefix("RRULE:")
    if not text:
        return ""
    parts: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, item = part.partition("=")
        if not eq or not item or name not in _RULE_PARTS or name in parts:
            raise ValueError(f"{part!r} is not an RRULE part (RFC 5545, e.g. FREQ=WEEKLY;COUNT=6)")
        parts[name] = item
    if parts.get("FREQ") not in _FREQ:
        raise ValueError("needs FREQ=DAILY, WEEKLY, MONTHLY or YEARLY (or a finer one)")
    if "UNTIL" in parts and "COUNT" in parts:
        raise ValueError("UNTIL and COUNT cannot both be given (RFC 5545)")
    for name in ("COUNT", "INTERVAL"):
        if name in parts and not re.fullmatch(r"[1-9][0-9]*", parts[name]):
            raise ValueError(f"{name} must be a positive whole number")
    if "UNTIL" in parts and not re.fullmatch(r"\d{8}(T\d{6}Z?)?", parts["UNTIL"]):
        raise ValueError("UNTIL must be an iCalendar date or UTC date-time (20261231T235959Z)")
    return text


Address = Annotated[str, AfterValidator(_address)]
OptionalAddress = Annotated[str, AfterValidator(_optional_address)]
MomentIn = Annotated[dt.datetime | dt.date, PlainValidator(_moment, json_schema_input_type=str)]
InstantIn = Annotated[dt.datetime, PlainValidator(_instant, json_schema_input_type=str)]
Text = Annotated[str, Field(max_length=100_000)]
Line = Annotated[str, Field(max_length=1000)]
Uid = Annotated[str, Field(min_length=1, max_length=255, description=(
    "the record's UID (global, as in iCalendar); leave out on create to get a new one"))]
Owner = Annotated[str, Field(min_length=1, max_length=320, description=(
    "the application user who owns the record: the user's mailbox login, usually its address"))]


def _new_uid() -> str:
    return str(uuid.uuid4())


def _lower(value: str) -> str:
    return value.strip().lower()


def _aware(value: Moment, zone: str) -> Moment:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return value


def _same_kind(start: Moment, end: Moment) -> None:
    if isinstance(start, dt.datetime) is not isinstance(end, dt.datetime):
        raise ValueError("must be a date when start is a date (all-day) and a date-time when "
                         "start is one")


def _compare(value: Moment) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttendeeIn(In):
    address: Address
    name: Line = ""
    role: AttendeeRole = AttendeeRole.REQUIRED
    response: Answer = Answer.NEEDS_ACTION


class OccurrenceIn(In):
    """A changed instance of a recurring appointment; times without offset use the
    appointment's time zone."""

    recurrence_id: MomentIn
    start: MomentIn
    end: MomentIn
    subject: Line
    location: Line = ""
    body: Text = ""

    @field_validator("end")
    @classmethod
    def _end(cls, end: Moment, info: ValidationInfo) -> Moment:
        start = info.data.get("start")
        if start is not None:
            _same_kind(start, end)
            if _comparable(start, end) and _compare(end) < _compare(start):
                raise ValueError("is before start")
        return end


def _comparable(a: Moment, b: Moment) -> bool:
    """Both aware or both naive (naive ones are resolved later against the time zone)."""
    aware = [isinstance(v, dt.datetime) and v.tzinfo is not None for v in (a, b)]
    dates = [not isinstance(v, dt.datetime) for v in (a, b)]
    return all(dates) or aware[0] == aware[1]


class AppointmentIn(In):
    """A new appointment (or, for PATCH, the fields to change)."""

    uid: Uid = Field(default_factory=_new_uid)
    owner: Annotated[Owner, AfterValidator(_lower)]
    subject: Line
    timezone: Annotated[str, AfterValidator(_zone)] = Field(
        "UTC", description="IANA name the times are entered in; date-times without an "
                           "offset are read in it")
    start: MomentIn = Field(description="a date-time, or a date for an all-day appointment")
    end: MomentIn = Field(description="not before start; for all-day ones the day after the "
                                      "last day (iCalendar DTEND)")
    all_day: bool | None = Field(None, description="follows from start being a date; "
                                                   "optional, checked when given")
    location: Line = ""
    organizer: OptionalAddress = ""
    attendees: list[AttendeeIn] = Field(default_factory=list, max_length=1000)
    rrule: Annotated[str, AfterValidator(_rrule)] = Field(
        "", description="RFC 5545 RRULE value, e.g. FREQ=WEEKLY;COUNT=10")
    cancelled_occurrences: list[MomentIn] = Field(default_factory=list, description="EXDATE")
    occurrences: list[OccurrenceIn] = Field(default_factory=list)
    reminder_minutes: Annotated[int, Field(ge=0, le=60 * 24 * 366)] | None = None
    busy: BusyStatus = BusyStatus.BUSY
    status: AppointmentStatus = AppointmentStatus.OPEN
    body: Text = ""

    @field_validator("start")
    @classmethod
    def _start(cls, start: Moment, info: ValidationInfo) -> Moment:
        return _aware(start, info.data.get("timezone", "UTC"))

    @field_validator("end")
    @classmethod
    def _end(cls, end: Moment, info: ValidationInfo) -> Moment:
        end = _aware(end, info.data.get("timezone", "UTC"))
        start = info.data.get("start")
        if start is not None:
            _same_kind(start, end)
            if _compare(end) < _compare(start):
                raise ValueError("is before start")
        return end

    @field_validator("all_day")
    @classmethod
    def _all_day(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        start = info.data.get("start")
        if value is not None and start is not None and value is isinstance(start, dt.datetime):
            raise ValueError("all-day appointments have dates, timed ones date-times"
                             if value else "a date-only start makes the appointment all-day")
        return value

    @field_validator("cancelled_occurrences", "occurrences")
    @classmethod
    def _recurring(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        if value and not info.data.get("rrule"):
            raise ValueError("only a recurring appointment (with an rrule) has occurrences")
        return value

    def to_core(self) -> Appointment:
        zone = self.timezone
        start, end = _aware(self.start, zone), _aware(self.end, zone)
        return Appointment(
            uid=self.uid, subject=self.subject, start=start, end=end, timezone=zone,
            all_day=not isinstance(start, dt.datetime), location=self.location,
            organizer=self.organizer,
            attendees=tuple(Attendee(a.address, a.name, a.role, a.response)
                            for a in self.attendees),
            rrule=self.rrule,
            cancelled_occurrences=tuple(_aware(c, zone)
                                        for c in self.cancelled_occurrences),
            occurrences=tuple(Occurrence(_aware(o.recurrence_id, zone),
                                         _aware(o.start, zone), _aware(o.end, zone),
                                         o.subject, o.location, o.body)
                              for o in self.occurrences),
            reminder_minutes=self.reminder_minutes, busy=self.busy, status=self.status,
            body=self.body, owner=self.owner)


class PhoneIn(In):
    kind: Literal["work", "home", "cell", "fax", "other"] = "work"
    number: Annotated[str, Field(min_length=1, max_length=100)]


class PostalAddressIn(In):
    kind: Literal["work", "home", "other"] = "work"
    street: Line = ""
    city: Line = ""
    region: Line = ""
    postcode: Line = ""
    country: Line = ""


class ContactIn(In):
    uid: Uid = Field(default_factory=_new_uid)
    owner: Annotated[Owner, AfterValidator(_lower)]
    full_name: Annotated[str, Field(min_length=1, max_length=1000)]
    given_name: Line = ""
    family_name: Line = ""
    middle_name: Line = ""
    prefix: Line = ""
    suffix: Line = ""
    organization: Line = ""
    job_title: Line = ""
    emails: list[Address] = Field(default_factory=list, max_length=100)
    phones: list[PhoneIn] = Field(default_factory=list, max_length=100)
    addresses: list[PostalAddressIn] = Field(default_factory=list, max_length=100)
    birthday: dt.date | None = None
    notes: Text = ""

    def to_core(self) -> Contact:
        return Contact(
            uid=self.uid, full_name=self.full_name, given_name=self.given_name,
            family_name=self.family_name, middle_name=self.middle_name, prefix=self.prefix,
            suffix=self.suffix, organization=self.organization, job_title=self.job_title,
            emails=tuple(self.emails), phones=tuple(Phone(p.kind, p.number) for p in self.phones),
            addresses=tuple(PostalAddress(a.kind, a.street, a.city, a.region, a.postcode,
                                          a.country) for a in self.addresses),
            birthday=self.birthday, notes=self.notes, owner=self.owner)


def _offset(value: Moment | None) -> Moment | None:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        raise ValueError("needs a UTC offset (2026-01-05T09:00:00Z or +01:00) or a date alone")
    return value


class TaskIn(In):
    uid: Uid = Field(default_factory=_new_uid)
    owner: Annotated[Owner, AfterValidator(_lower)]
    subject: Line
    start: Annotated[MomentIn | None, AfterValidator(_offset)] = None
    due: Annotated[MomentIn | None, AfterValidator(_offset)] = None
    status: TaskStatus = TaskStatus.NOT_STARTED
    percent_complete: Annotated[int, Field(ge=0, le=100)] = 0
    priority: Annotated[int, Field(ge=0, le=9, description=(
        "iCalendar PRIORITY: 0 undefined, 1 highest .. 9 lowest"))] = 0
    completed_at: Annotated[InstantIn | None, AfterValidator(_offset)] = None
    body: Text = ""
    rrule: Annotated[str, AfterValidator(_rrule)] = Field(
        "", description="RFC 5545 RRULE of a recurring task, e.g. FREQ=WEEKLY;BYDAY=FR; "
        "repeats from due (or start), which it needs")

    @field_validator("due")
    @classmethod
    def _due(cls, due: Moment | None, info: ValidationInfo) -> Moment | None:
        start = info.data.get("start")
        if due is not None and start is not None:
            _same_kind(start, due)  # RFC 5545: DUE has DTSTART's value type
            if _compare(due) < _compare(start):
                raise ValueError("is before start")
        return due

    @field_validator("rrule")
    @classmethod
    def _anchored(cls, rule: str, info: ValidationInfo) -> str:
        if rule and info.data.get("due") is None and info.data.get("start") is None:
            raise ValueError("a recurring task needs a due date or a start to repeat from")
        return rule

    def to_core(self) -> Task:
        return Task(uid=self.uid, subject=self.subject, due=self.due, start=self.start,
                    status=self.status, percent_complete=self.percent_complete,
                    priority=self.priority, completed_at=self.completed_at, body=self.body,
                    rrule=self.rrule, owner=self.owner)


RecordIn = AppointmentIn | ContactIn | TaskIn


class ActFilterIn(In):
    """Which application records sync to one mailbox's calendar, address book and tasks."""

    appointments: AppointmentScope = AppointmentScope.ORGANISED_OR_ATTENDED
    contacts: ContactScope = ContactScope.OWNED
    tasks: TaskScope = TaskScope.ALL

    def to_core(self) -> ActFilter:
        return ActFilter(self.appointments, self.contacts, self.tasks)


# ---------------------------------------------------------------- responses

class Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AttendeeOut(Out):
    address: str
    name: str
    role: AttendeeRole
    response: Answer


class OccurrenceOut(Out):
    recurrence_id: dt.datetime | dt.date
    start: dt.datetime | dt.date
    end: dt.datetime | dt.date
    subject: str
    location: str
    body: str


class AppointmentOut(Out):
    uid: str
    owner: str
    subject: str
    timezone: str
    start: dt.datetime | dt.date
    end: dt.datetime | dt.date
    all_day: bool
    location: str
    organizer: str
    attendees: list[AttendeeOut]
    rrule: str
    cancelled_occurrences: list[dt.datetime | dt.date]
    occurrences: list[OccurrenceOut]
    reminder_minutes: int | None
    busy: BusyStatus
    status: AppointmentStatus
    body: str
    modified_at: dt.datetime | None


class PhoneOut(Out):
    kind: str
    number: str


class PostalAddressOut(Out):
    kind: str
    street: str
    city: str
    region: str
    postcode: str
    country: str


class ContactOut(Out):
    uid: str
    owner: str
    full_name: str
    given_name: str
    family_name: str
    middle_name: str
    prefix: str
    suffix: str
    organization: str
    job_title: str
    emails: list[str]
    phones: list[PhoneOut]
    addresses: list[PostalAddressOut]
    birthday: dt.date | None
    notes: str
    modified_at: dt.datetime | None


class TaskOut(Out):
    uid: str
    owner: str
    subject: str
    start: dt.datetime | dt.date | None
    due: dt.datetime | dt.date | None
    status: TaskStatus
    percent_complete: int
    priority: int
    completed_at: dt.datetime | None
    body: str
    rrule: str
    modified_at: dt.datetime | None


class ConflictOut(Out):
    kind: str
    uid: str
    reason: str
    winner: str
    policy: str
    at: dt.datetime


def _fields(record: Record) -> dict[str, Any]:
    # dataclasses.asdict recurses into attendees/phones/...; the records hold no secrets.
    data = dataclasses.asdict(record)
    data.pop("id", None)
    return data


def appointment_out(record: Appointment) -> AppointmentOut:
    return AppointmentOut.model_validate(_fields(record))


def contact_out(record: Contact) -> ContactOut:
    return ContactOut.model_validate(_fields(record))


def task_out(record: Task) -> TaskOut:
    return TaskOut.model_validate(_fields(record))


def conflict_out(conflict: ConflictRecord) -> ConflictOut:
    return ConflictOut(kind=conflict.kind.value, uid=conflict.ident, reason=conflict.reason,
                       winner=conflict.winner, policy=conflict.policy, at=conflict.at)


def editable(record: Record) -> dict[str, Any]:
    """The record as input fields, for PATCH: the stored values a change is laid over."""
    data = _fields(record)
    data.pop("modified_at", None)
    if isinstance(record, Appointment):
        data.pop("all_day", None)  # follows from start; a changed start must not contradict it
    return data
