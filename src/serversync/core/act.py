"""Appointments, contacts and tasks ("ACT"): the application's records and their sync rules.

Plain frozen dataclasses, standard library only. The fields follow the reference system's
appointment, contact and task entities (``reference/dynamics-sss.md`` §3.8) and map onto
iCalendar VEVENT / VTODO (RFC 5545) and vCard 3/4 (RFC 2426, RFC 6350); the mapping itself
lives in `connectors.ical`.

Three things live here because both the planner and the services need them:

* `content_hash` — one canonical hash per record over the *synced* fields only (never the
  owner, the database id or timestamps), so that the application's copy and the server's
  copy of the same item hash the same when they say the same thing;
* `for_server` — the reference's rules on the way out: completed or cancelled appointments
  sync as *free* with no reminder, and a reminder more than seven days in the past is dropped;
  `sends_invitations` — invitations go only for future appointments the user organises;
* `ActFilter` — the per-user sync filters: which application records reach the server.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


class ItemKind(enum.StrEnum):
    APPOINTMENT = "appointment"
    CONTACT = "contact"
    TASK = "task"


class BusyStatus(enum.StrEnum):
    """How the appointment shows in free/busy (iCalendar TRANSP plus Outlook's nuance)."""

    BUSY = "busy"
    FREE = "free"
    TENTATIVE = "tentative"
    OUT_OF_OFFICE = "out-of-office"


class AppointmentStatus(enum.StrEnum):
    OPEN = "open"  # scheduled (iCalendar CONFIRMED)
    TENTATIVE = "tentative"
    COMPLETED = "completed"  # the application's "done"; the server has no such state
    CANCELLED = "cancelled"


class Response(enum.StrEnum):
    """An attendee's answer (iCalendar PARTSTAT)."""

    NEEDS_ACTION = "needs-action"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    TENTATIVE = "tentative"
    DELEGATED = "delegated"


class AttendeeRole(enum.StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    RESOURCE = "resource"  # NON-PARTICIPANT / room or equipment


class TaskStatus(enum.StrEnum):
    NOT_STARTED = "not-started"  # VTODO NEEDS-ACTION
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


Moment = dt.datetime | dt.date  # a date alone is an all-day value


@dataclass(frozen=True, slots=True)
class Attendee:
    address: str
    name: str = ""
    role: AttendeeRole = AttendeeRole.REQUIRED
    response: Response = Response.NEEDS_ACTION


@dataclass(frozen=True, slots=True)
class Occurrence:
    """A changed instance of a recurring appointment (iCalendar RECURRENCE-ID override)."""

    recurrence_id: Moment
    start: Moment
    end: Moment
    subject: str
    location: str = ""
    body: str = ""


@dataclass(frozen=True, slots=True)
class Appointment:
    uid: str
    subject: str
    start: Moment  # aware datetime, or a date when all-day
    end: Moment
    timezone: str = "UTC"  # IANA name the times were entered in (DTSTART;TZID=...)
    all_day: bool = False
    location: str = ""
    organizer: str = ""  # address
    attendees: tuple[Attendee, ...] = ()
    rrule: str = ""  # RFC 5545 RRULE value, e.g. "FREQ=WEEKLY;COUNT=10"
    cancelled_occurrences: tuple[Moment, ...] = ()  # EXDATE
    occurrences: tuple[Occurrence, ...] = ()  # changed instances
    reminder_minutes: int | None = None  # before start; None = no reminder
    busy: BusyStatus = BusyStatus.BUSY
    status: AppointmentStatus = AppointmentStatus.OPEN
    body: str = ""
    owner: str = ""  # the application user who owns the record; not synced
    modified_at: dt.datetime | None = None  # not hashed
    id: int | None = None

    kind = ItemKind.APPOINTMENT

    @property
    def last_end(self) -> Moment | None:
        """When the whole series is over, or None when it never ends (open RRULE)."""
        if not self.rrule:
            return self.end
        parts = dict(p.split("=", 1) for p in self.rrule.upper().split(";") if "=" in p)
        if "UNTIL" in parts:
            return parse_moment(parts["UNTIL"])
        return None if "COUNT" not in parts else _count_end(self, parts)


def _count_end(appointment: Appointment, parts: dict[str, str]) -> Moment | None:
    # Conservative bound for COUNT rules: COUNT x interval x the longest period. A series
    # whose bound has not passed is treated as current, which only ever keeps deletes live.
    period = {"DAILY": 1, "WEEKLY": 7, "MONTHLY": 31, "YEARLY": 366}.get(parts.get("FREQ", ""))
    if period is None:
        return None
    try:
        days = int(parts["COUNT"]) * int(parts.get("INTERVAL", "1")) * period
    except ValueError:
        return None
    return appointment.end + dt.timedelta(days=days)


@dataclass(frozen=True, slots=True)
class PostalAddress:
    kind: str = "work"  # work / home / other
    street: str = ""
    city: str = ""
    region: str = ""
    postcode: str = ""
    country: str = ""


@dataclass(frozen=True, slots=True)
class Phone:
    kind: str  # work / home / cell / fax / other
    number: str


@dataclass(frozen=True, slots=True)
class Contact:
    uid: str
    full_name: str
    given_name: str = ""
    family_name: str = ""
    middle_name: str = ""
    prefix: str = ""
    suffix: str = ""
    organization: str = ""
    job_title: str = ""
    emails: tuple[str, ...] = ()
    phones: tuple[Phone, ...] = ()
    addresses: tuple[PostalAddress, ...] = ()
    birthday: dt.date | None = None
    notes: str = ""
    owner: str = ""
    modified_at: dt.datetime | None = None
    id: int | None = None

    kind = ItemKind.CONTACT


@dataclass(frozen=True, slots=True)
class Task:
    uid: str
    subject: str
    due: Moment | None = None
    start: Moment | None = None
    status: TaskStatus = TaskStatus.NOT_STARTED
    percent_complete: int = 0
    priority: int = 0  # iCalendar PRIORITY: 0 undefined, 1 highest .. 9 lowest
    completed_at: dt.datetime | None = None
    body: str = ""
    rrule: str = ""  # RFC 5545 RRULE of a recurring task, anchored on due (or start)
    owner: str = ""
    modified_at: dt.datetime | None = None
    id: int | None = None

    kind = ItemKind.TASK

    @property
    def is_completed(self) -> bool:
        return self.status is TaskStatus.COMPLETED


Record = Appointment | Contact | Task
_UNHASHED = frozenset({"owner", "modified_at", "id"})


# ---------------------------------------------------------------- canonical form

def _canon(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # floating time: keep it floating, it is a different value
            return "F" + value.isoformat()
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return "D" + value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canon(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in _UNHASHED}
    if isinstance(value, tuple | list):
        return [_canon(v) for v in value]
    return value


def canonical(record: Record) -> dict[str, Any]:
    """The synced fields as JSON-ready values (UTC instants, enum values)."""
    data: dict[str, Any] = _canon(record)
    data["kind"] = record.kind.value
    if isinstance(record, Appointment):
        # order carries no meaning in these sets
        data["attendees"] = sorted(data["attendees"], key=lambda a: a["address"])
        data["cancelled_occurrences"] = sorted(data["cancelled_occurrences"])
        data["occurrences"] = sorted(data["occurrences"], key=lambda o: o["recurrence_id"])
    elif isinstance(record, Task) and not record.rrule:
        del data["rrule"]  # added later: one-off tasks keep the hash they always had
    return data


def content_hash(record: Record) -> str:
    """SHA-256 of the canonical form: equal hashes mean equal synced content."""
    text = json.dumps(canonical(record), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def parse_moment(text: str) -> Moment:
    """An iCalendar DATE or DATE-TIME (``20260105``, ``20260105T090000Z``) — used by RRULE UNTIL."""
    text = text.strip()
    if len(text) == 8:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    value = dt.datetime.strptime(text.rstrip("Z"), "%Y%m%dT%H%M%S")
    return value.replace(tzinfo=dt.UTC)


def as_instant(value: Moment) -> dt.datetime:
    """A comparable UTC instant: dates are taken at midnight UTC, floating times as UTC."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)


# ---------------------------------------------------------------- the reference's rules

def is_past(record: Record, now: dt.datetime) -> bool:
    """An appointment (series) that is over. Contacts and tasks are never "past"."""
    if not isinstance(record, Appointment):
        return False
    end = record.last_end
    return end is not None and as_instant(end) < now


def for_server(record: Record, now: dt.datetime) -> Record:
    """The record as it goes to the server, after the reference's rules.

    Completed or cancelled appointments are shown as free with no reminder; a reminder that
    would fire more than seven days in the past is dropped (it would only pop up stale).
    """
    if not isinstance(record, Appointment):
        return record
    if record.status in (AppointmentStatus.COMPLETED, AppointmentStatus.CANCELLED):
        return dataclasses.replace(record, busy=BusyStatus.FREE, reminder_minutes=None)
    if record.reminder_minutes is not None and as_instant(record.start) < now - dt.timedelta(days=7):
        return dataclasses.replace(record, reminder_minutes=None)
    return record


def sends_invitations(record: Record, user: str, now: dt.datetime) -> bool:
    """Whether the server may send invitations for this appointment on ``user``'s behalf:
    only for future appointments that have attendees and that ``user`` organises."""
    return (isinstance(record, Appointment) and bool(record.attendees)
            and record.organizer.lower() == user.lower()
            and as_instant(record.start) > now)


def complete_task(task: Task, when: dt.datetime | None) -> Task:
    """``task`` marked completed (a completion seen on the other side is never lost)."""
    return dataclasses.replace(task, status=TaskStatus.COMPLETED, percent_complete=100,
                               completed_at=task.completed_at or when)


# ---------------------------------------------------------------- sync filters

class AppointmentScope(enum.StrEnum):
    ORGANISED = "organised"
    ORGANISED_OR_ATTENDED = "organised-or-attended"
    OWNED = "owned"  # records the user owns, whoever organises them
    NONE = "none"


class ContactScope(enum.StrEnum):
    OWNED = "owned"
    NONE = "none"


class TaskScope(enum.StrEnum):
    OPEN = "open"  # not completed and not cancelled
    ALL = "all"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class ActFilter:
    """Which application records sync to one user's server collections.

    The reference calls these "user filters"; the defaults sync what a user would expect
    in their own calendar, address book and task list. A record leaving the filter is
    removed from the server only when the profile's ``remove_unfiltered`` is on.
    """

    appointments: AppointmentScope = AppointmentScope.ORGANISED_OR_ATTENDED
    contacts: ContactScope = ContactScope.OWNED
    tasks: TaskScope = TaskScope.ALL

    def kinds(self) -> tuple[ItemKind, ...]:
        out = []
        if self.appointments is not AppointmentScope.NONE:
            out.append(ItemKind.APPOINTMENT)
        if self.contacts is not ContactScope.NONE:
            out.append(ItemKind.CONTACT)
        if self.tasks is not TaskScope.NONE:
            out.append(ItemKind.TASK)
        return tuple(out)


def in_filter(record: Record, user: str, flt: ActFilter) -> bool:
    user = user.lower()
    if isinstance(record, Appointment):
        scope = flt.appointments
        organises = record.organizer.lower() == user
        if scope is AppointmentScope.ORGANISED:
            return organises
        if scope is AppointmentScope.ORGANISED_OR_ATTENDED:
            return organises or record.owner.lower() == user or any(
                a.address.lower() == user for a in record.attendees)
        if scope is AppointmentScope.OWNED:
            return record.owner.lower() == user
        return False
    if isinstance(record, Contact):
        return flt.contacts is ContactScope.OWNED and record.owner.lower() == user
    if flt.tasks is TaskScope.NONE or record.owner.lower() != user:
        return False
    return flt.tasks is TaskScope.ALL or record.status not in (TaskStatus.COMPLETED,
                                                               TaskStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    """One conflict the planner resolved, kept for the administrator."""

    kind: ItemKind
    ident: str
    reason: str
    winner: str  # "application" or "server"
    policy: str
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
