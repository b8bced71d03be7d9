"""iCalendar (RFC 5545) and vCard (RFC 2426 / RFC 6350) to and from `core.act` records.

``icalendar`` reads and writes VEVENT and VTODO; ``vobject`` reads vCard 3.0 and 4.0 and
writes 3.0, which every CardDAV server accepts. Parsing is strict where a wrong guess would
corrupt the user's data and raises `core.errors.ItemError` (the caller quarantines the item):
no UID, a date that does not parse, a TZID that is neither an IANA zone nor defined by a
VTIMEZONE in the same object, no component we know. Properties we do not model are ignored
on the way in; they are lost if the application's copy later overwrites the server's, which
is the documented price of a record-level (not property-level) merge.

Mapping notes:
* application appointment status "completed" has no iCalendar VEVENT equivalent; it travels
  as ``STATUS:CONFIRMED`` plus ``X-SERVERSYNC-STATUS:COMPLETED`` so it survives a round trip;
* busy status: ``TRANSP`` plus Outlook's ``X-MICROSOFT-CDO-BUSYSTATUS`` (tentative, OOF);
* one reminder: the first ``VALARM`` whose ``TRIGGER`` is relative to the start;
* invitations: attendees get ``SCHEDULE-AGENT=CLIENT`` (RFC 6638 §7.1) unless the caller says
  the server may send invitations — the reference sends them only for future appointments
  the syncing user organises (`core.act.sends_invitations`).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import icalendar
import vobject

from serversync.core.act import (
    Appointment,
    AppointmentStatus,
    Attendee,
    AttendeeRole,
    BusyStatus,
    Contact,
    Moment,
    Occurrence,
    Phone,
    PostalAddress,
    Record,
    Response,
    Task,
    TaskStatus,
)
from serversync.core.errors import ItemError

PRODID = "-//serversync//serversync//EN"

_ROLE_IN = {"REQ-PARTICIPANT": AttendeeRole.REQUIRED, "CHAIR": AttendeeRole.REQUIRED,
            "OPT-PARTICIPANT": AttendeeRole.OPTIONAL, "NON-PARTICIPANT": AttendeeRole.RESOURCE}
_ROLE_OUT = {AttendeeRole.REQUIRED: "REQ-PARTICIPANT", AttendeeRole.OPTIONAL: "OPT-PARTICIPANT",
             AttendeeRole.RESOURCE: "NON-PARTICIPANT"}
_TASK_IN = {"NEEDS-ACTION": TaskStatus.NOT_STARTED, "IN-PROCESS": TaskStatus.IN_PROGRESS,
            "COMPLETED": TaskStatus.COMPLETED, "CANCELLED": TaskStatus.CANCELLED}
_TASK_OUT = {v: k for k, v in _TASK_IN.items()}
_BUSY_CDO = {"TENTATIVE": BusyStatus.TENTATIVE, "OOF": BusyStatus.OUT_OF_OFFICE,
             "FREE": BusyStatus.FREE, "BUSY": BusyStatus.BUSY}


def _bad(what: str, fix: str = "correct or delete the item on the server") -> ItemError:
    return ItemError(what, fix=fix, code="bad-item")


def _text(component: Any, name: str) -> str:
    value = component.get(name)
    return "" if value is None else str(value)


def _moment(component: Any, name: str, uid: str) -> Moment | None:
    prop = component.get(name)
    if prop is None:
        return None
    if isinstance(prop, list):
        prop = prop[0]
    if type(prop).__name__ == "vBroken" or not hasattr(prop, "dt"):
        raise _bad(f"item {uid!r}: {name} is not a valid date or time ({prop})")
    return _check_zone(prop.dt, getattr(prop, "params", {}), name, uid)


def _check_zone(value: Any, params: Any, name: str, uid: str) -> Moment:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None and params.get("TZID"):
            raise _bad(f"item {uid!r}: {name} uses the unknown time zone {params['TZID']!r}",
                       fix="use an IANA time zone name or include its VTIMEZONE")
        return value
    if isinstance(value, dt.date):
        return value
    raise _bad(f"item {uid!r}: {name} is not a date or time ({value!r})")


def _zone_name(value: Moment) -> str:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        key = getattr(value.tzinfo, "key", None)
        if key:
            return str(key)
        name = value.tzinfo.tzname(value)
        return "UTC" if name in ("UTC", "Z") else str(name or "UTC")
    return "UTC"


def _modified(component: Any) -> dt.datetime | None:
    for name in ("LAST-MODIFIED", "DTSTAMP"):
        prop = component.get(name)
        if prop is not None and isinstance(getattr(prop, "dt", None), dt.datetime):
            value: dt.datetime = prop.dt
            return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return None


def _address(value: Any) -> str:
    text = str(value)
    return text[7:] if text.lower().startswith("mailto:") else text


def _dates(component: Any, name: str, uid: str) -> tuple[Moment, ...]:
    props = component.get(name)
    if props is None:
        return ()
    out: list[Moment] = []
    for prop in props if isinstance(props, list) else [props]:
        if type(prop).__name__ == "vBroken" or not hasattr(prop, "dts"):
            raise _bad(f"item {uid!r}: {name} is not a list of dates ({prop})")
        out.extend(_check_zone(d.dt, prop.params, name, uid) for d in prop.dts)
    return tuple(out)


def _reminder(component: Any) -> int | None:
    for alarm in component.walk("VALARM"):
        trigger = alarm.get("TRIGGER")
        if trigger is None or trigger.params.get("RELATED", "START") != "START":
            continue
        if isinstance(trigger.dt, dt.timedelta):
            return max(0, int(-trigger.dt.total_seconds() // 60))
    return None


def _end(component: Any, start: Moment, uid: str) -> Moment:
    end = _moment(component, "DTEND", uid)
    if end is not None:
        return end
    duration = component.get("DURATION")
    if duration is not None and isinstance(getattr(duration, "dt", None), dt.timedelta):
        moved: Moment = start + duration.dt
        return moved
    return start + dt.timedelta(days=1) if not isinstance(start, dt.datetime) else start


def _appointment(master: Any, overrides: list[Any], uid: str) -> Appointment:
    start = _moment(master, "DTSTART", uid)
    if start is None:
        raise _bad(f"event {uid!r} has no DTSTART")
    end = _end(master, start, uid)
    if type(start) is not type(end):
        raise _bad(f"event {uid!r}: DTSTART and DTEND mix a date and a date-time")
    status = _text(master, "STATUS").upper()
    if _text(master, "X-SERVERSYNC-STATUS").upper() == "COMPLETED":
        app_status = AppointmentStatus.COMPLETED
    else:
        app_status = {"TENTATIVE": AppointmentStatus.TENTATIVE,
                      "CANCELLED": AppointmentStatus.CANCELLED}.get(status, AppointmentStatus.OPEN)
    cdo = _text(master, "X-MICROSOFT-CDO-BUSYSTATUS").upper()
    busy = _BUSY_CDO.get(cdo) or (BusyStatus.FREE if _text(master, "TRANSP").upper()
                                  == "TRANSPARENT" else BusyStatus.BUSY)
    attendees = []
    for prop in _list(master.get("ATTENDEE")):
        params = prop.params
        role = AttendeeRole.RESOURCE if params.get("CUTYPE", "").upper() in ("RESOURCE", "ROOM") \
            else _ROLE_IN.get(params.get("ROLE", "REQ-PARTICIPANT").upper(), AttendeeRole.REQUIRED)
        try:
            response = Response(params.get("PARTSTAT", "NEEDS-ACTION").lower())
        except ValueError:
            response = Response.NEEDS_ACTION
        attendees.append(Attendee(_address(prop).lower(), params.get("CN", ""), role, response))
    rrule = master.get("RRULE")
    cancelled = list(_dates(master, "EXDATE", uid))
    occurrences = []
    for sub in overrides:
        rid = _moment(sub, "RECURRENCE-ID", uid)
        assert rid is not None
        if _text(sub, "STATUS").upper() == "CANCELLED":
            cancelled.append(rid)
            continue
        sub_start = _moment(sub, "DTSTART", uid) or rid
        occurrences.append(Occurrence(rid, sub_start, _end(sub, sub_start, uid),
                                      _text(sub, "SUMMARY"), _text(sub, "LOCATION"),
                                      _text(sub, "DESCRIPTION")))
    organizer = master.get("ORGANIZER")
    return Appointment(
        uid=uid, subject=_text(master, "SUMMARY"), start=start, end=end,
        timezone=_zone_name(start), all_day=not isinstance(start, dt.datetime),
        location=_text(master, "LOCATION"),
        organizer=_address(organizer).lower() if organizer is not None else "",
        attendees=tuple(attendees),
        rrule=rrule.to_ical().decode() if rrule is not None else "",
        cancelled_occurrences=tuple(cancelled), occurrences=tuple(occurrences),
        reminder_minutes=_reminder(master), busy=busy, status=app_status,
        body=_text(master, "DESCRIPTION"), modified_at=_modified(master))


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _task(todo: Any, uid: str) -> Task:
    completed = _moment(todo, "COMPLETED", uid)
    percent = todo.get("PERCENT-COMPLETE")
    priority = todo.get("PRIORITY")
    try:
        percent_value = max(0, min(100, int(percent))) if percent is not None else 0
        priority_value = max(0, min(9, int(priority))) if priority is not None else 0
    except (TypeError, ValueError) as exc:
        raise _bad(f"task {uid!r}: PERCENT-COMPLETE or PRIORITY is not a number") from exc
    if completed is not None and not isinstance(completed, dt.datetime):
        raise _bad(f"task {uid!r}: COMPLETED must be a date-time")
    return Task(
        uid=uid, subject=_text(todo, "SUMMARY"), due=_moment(todo, "DUE", uid),
        start=_moment(todo, "DTSTART", uid),
        status=_TASK_IN.get(_text(todo, "STATUS").upper(), TaskStatus.NOT_STARTED),
        percent_complete=percent_value, priority=priority_value, completed_at=completed,
        body=_text(todo, "DESCRIPTION"),
        rrule=rrule.to_ical().decode() if (rrule := todo.get("RRULE")) is not None else "",
        modified_at=_modified(todo))


def parse_calendar(raw: bytes) -> Appointment | Task:
    """One calendar object resource: a VEVENT (with its overrides) or a VTODO."""
    try:
        calendar = icalendar.Calendar.from_ical(raw)
    except (ValueError, IndexError, KeyError) as exc:
        raise _bad(f"not iCalendar data: {exc}") from exc
    if not isinstance(calendar, icalendar.Calendar):
        raise _bad("not one VCALENDAR object")
    components = [c for c in calendar.subcomponents if c.name in ("VEVENT", "VTODO")]
    if not components:
        raise _bad("no VEVENT or VTODO in the calendar object")
    for component in components:
        if component.errors:
            name, message = component.errors[0]
            raise _bad(f"{component.name} {_text(component, 'UID')!r}: {name}: {message}")
    uids = {_text(c, "UID") for c in components}
    if "" in uids:
        raise _bad("a calendar item has no UID", fix="give the item a UID on the server")
    if len(uids) > 1:
        raise _bad(f"one calendar object holds several UIDs ({', '.join(sorted(uids))})")
    uid = uids.pop()
    if components[0].name == "VTODO":
        return _task(components[0], uid)
    masters = [c for c in components if c.get("RECURRENCE-ID") is None]
    if len(masters) != 1:
        raise _bad(f"event {uid!r}: expected one master VEVENT, found {len(masters)}")
    overrides = [c for c in components if c.get("RECURRENCE-ID") is not None]
    return _appointment(masters[0], overrides, uid)


# ---------------------------------------------------------------- writing iCalendar

def _plain(value: Moment) -> Moment:
    """Fixed UTC offsets have no TZID a reader could resolve: write them as UTC."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None \
            and not getattr(value.tzinfo, "key", None):
        return value.astimezone(dt.UTC)
    return value


def _zoned(value: Moment, zone: str) -> Moment:
    """Express an instant in the appointment's own zone, so DTSTART carries its TZID."""
    if not isinstance(value, dt.datetime) or value.tzinfo is None or zone == "UTC":
        return _plain(value)
    try:
        return value.astimezone(zoneinfo.ZoneInfo(zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return _plain(value)


def _event(appointment: Appointment, invitations: bool) -> list[icalendar.Event]:
    event = icalendar.Event()
    zone = appointment.timezone
    event.add("uid", appointment.uid)
    event.add("dtstamp", dt.datetime.now(dt.UTC).replace(microsecond=0))
    if appointment.modified_at is not None:
        event.add("last-modified", appointment.modified_at.astimezone(dt.UTC).replace(microsecond=0))
    event.add("summary", appointment.subject)
    event.add("dtstart", _zoned(appointment.start, zone))
    event.add("dtend", _zoned(appointment.end, zone))
    if appointment.location:
        event.add("location", appointment.location)
    if appointment.body:
        event.add("description", appointment.body)
    status = appointment.status
    event.add("status", {AppointmentStatus.TENTATIVE: "TENTATIVE",
                         AppointmentStatus.CANCELLED: "CANCELLED"}.get(status, "CONFIRMED"))
    if status is AppointmentStatus.COMPLETED:
        event.add("x-serversync-status", "COMPLETED")
    event.add("transp", "TRANSPARENT" if appointment.busy is BusyStatus.FREE else "OPAQUE")
    event.add("x-microsoft-cdo-busystatus",
              {BusyStatus.BUSY: "BUSY", BusyStatus.FREE: "FREE", BusyStatus.TENTATIVE: "TENTATIVE",
               BusyStatus.OUT_OF_OFFICE: "OOF"}[appointment.busy])
    if appointment.organizer:
        event.add("organizer", icalendar.vCalAddress(f"mailto:{appointment.organizer}"))
    for attendee in appointment.attendees:
        prop = icalendar.vCalAddress(f"mailto:{attendee.address}")
        if attendee.name:
            prop.params["CN"] = attendee.name
        prop.params["ROLE"] = _ROLE_OUT[attendee.role]
        if attendee.role is AttendeeRole.RESOURCE:
            prop.params["CUTYPE"] = "RESOURCE"
        prop.params["PARTSTAT"] = attendee.response.value.upper()
        if not invitations:
            prop.params["SCHEDULE-AGENT"] = "CLIENT"
        event.add("attendee", prop)
    if appointment.rrule:
        event.add("rrule", icalendar.vRecur.from_ical(appointment.rrule))
    for cancelled in appointment.cancelled_occurrences:
        event.add("exdate", _zoned(cancelled, zone))
    if appointment.reminder_minutes is not None:
        alarm = icalendar.Alarm()
        alarm.add("action", "DISPLAY")
        alarm.add("description", appointment.subject or "Reminder")
        alarm.add("trigger", dt.timedelta(minutes=-appointment.reminder_minutes))
        event.add_component(alarm)
    out = [event]
    for occurrence in appointment.occurrences:
        sub = icalendar.Event()
        sub.add("uid", appointment.uid)
        sub.add("dtstamp", dt.datetime.now(dt.UTC).replace(microsecond=0))
        sub.add("recurrence-id", _zoned(occurrence.recurrence_id, zone))
        sub.add("dtstart", _zoned(occurrence.start, zone))
        sub.add("dtend", _zoned(occurrence.end, zone))
        sub.add("summary", occurrence.subject)
        if occurrence.location:
            sub.add("location", occurrence.location)
        if occurrence.body:
            sub.add("description", occurrence.body)
        out.append(sub)
    return out


def _todo(task: Task) -> icalendar.Todo:
    todo = icalendar.Todo()
    todo.add("uid", task.uid)
    todo.add("dtstamp", dt.datetime.now(dt.UTC).replace(microsecond=0))
    if task.modified_at is not None:
        todo.add("last-modified", task.modified_at.astimezone(dt.UTC).replace(microsecond=0))
    todo.add("summary", task.subject)
    if task.start is not None:
        todo.add("dtstart", _plain(task.start))
    if task.due is not None:
        todo.add("due", _plain(task.due))
    todo.add("status", _TASK_OUT[task.status])
    if task.percent_complete:
        todo.add("percent-complete", task.percent_complete)
    if task.priority:
        todo.add("priority", task.priority)
    if task.completed_at is not None:
        todo.add("completed", task.completed_at.astimezone(dt.UTC).replace(microsecond=0))
    if task.body:
        todo.add("description", task.body)
    if task.rrule:
        todo.add("rrule", icalendar.vRecur.from_ical(task.rrule))
    return todo


def render_calendar(record: Appointment | Task, *, invitations: bool = False) -> bytes:
    calendar = icalendar.Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    if isinstance(record, Appointment):
        for component in _event(record, invitations):
            calendar.add_component(component)
    else:
        calendar.add_component(_todo(record))
    calendar.add_missing_timezones()  # RFC 5545: every TZID needs its VTIMEZONE
    return bytes(calendar.to_ical())


# ---------------------------------------------------------------- vCard

def _vtext(card: Any, name: str) -> str:
    child = getattr(card, name, None)
    if child is None:
        return ""
    value = child.value
    return ",".join(value) if isinstance(value, list) else str(value)


def _types(line: Any) -> set[str]:
    out: set[str] = set()
    for value in line.params.get("TYPE", []):
        out.update(v.strip().lower() for v in value.split(","))
    return out


def _birthday(text: str, uid: str) -> dt.date | None:
    if not text:
        return None
    digits = text.strip()[:10].replace("-", "")
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError as exc:
        raise _bad(f"contact {uid!r}: BDAY {text!r} is not a date") from exc


def parse_vcard(raw: bytes) -> Contact:
    try:
        card = vobject.readOne(raw.decode("utf-8", errors="replace"))
    except Exception as exc:  # vobject raises ParseError, ValueError, AttributeError ...
        raise _bad(f"not vCard data: {exc}") from exc
    if getattr(card, "name", "").upper() != "VCARD":
        raise _bad("not a VCARD object")
    uid = _vtext(card, "uid")
    if not uid:
        raise _bad("a contact has no UID", fix="give the contact a UID on the server")
    n = getattr(card, "n", None)
    family = given = middle = prefix = suffix = ""
    if n is not None:
        value = n.value
        if isinstance(value, str):
            parts = (value.split(";") + [""] * 5)[:5]
            family, given, middle, prefix, suffix = parts
        else:
            family, given, middle, prefix, suffix = (
                " ".join(x) if isinstance(x, list) else str(x or "")
                for x in (value.family, value.given, value.additional, value.prefix,
                          value.suffix))
    emails = tuple(str(line.value).strip().lower()
                   for line in card.contents.get("email", []) if str(line.value).strip())
    phones = []
    for line in card.contents.get("tel", []):
        types = _types(line)
        kind = next((k for k in ("cell", "fax", "home", "work") if k in types), "other")
        number = str(line.value).strip()
        phones.append(Phone(kind, number[4:] if number.lower().startswith("tel:") else number))
    addresses = []
    for line in card.contents.get("adr", []):
        value = line.value
        types = _types(line)
        kind = next((k for k in ("home", "work") if k in types), "other")
        if isinstance(value, str):
            raise _bad(f"contact {uid!r}: ADR is not structured")

        def text(x: Any) -> str:
            return " ".join(x) if isinstance(x, list) else str(x or "")
        addresses.append(PostalAddress(kind, text(value.street), text(value.city),
                                       text(value.region), text(value.code),
                                       text(value.country)))
    org = getattr(card, "org", None)
    organization = ""
    if org is not None:
        organization = ";".join(org.value) if isinstance(org.value, list) else str(org.value)
    rev = _vtext(card, "rev")
    modified = None
    if rev:
        try:
            modified = dt.datetime.strptime(rev.replace("-", "").replace(":", "")[:15] + "Z",
                                            "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            modified = None  # REV is advisory; a bad one only loses newest-wins precision
    return Contact(
        uid=uid, full_name=_vtext(card, "fn"), given_name=given, family_name=family,
        middle_name=middle, prefix=prefix, suffix=suffix, organization=organization,
        job_title=_vtext(card, "title"), emails=emails, phones=tuple(phones),
        addresses=tuple(addresses), birthday=_birthday(_vtext(card, "bday"), uid),
        notes=_vtext(card, "note"), modified_at=modified)


def render_vcard(contact: Contact) -> bytes:
    card = vobject.vCard()
    card.add("version").value = "3.0"
    card.add("uid").value = contact.uid
    card.add("fn").value = contact.full_name or " ".join(
        p for p in (contact.given_name, contact.family_name) if p) or contact.uid
    card.add("n").value = vobject.vcard.Name(
        family=contact.family_name, given=contact.given_name, additional=contact.middle_name,
        prefix=contact.prefix, suffix=contact.suffix)
    if contact.organization:
        card.add("org").value = contact.organization.split(";")
    if contact.job_title:
        card.add("title").value = contact.job_title
    for address in contact.emails:
        line = card.add("email")
        line.value = address
        line.type_param = "INTERNET"
    for phone in contact.phones:
        line = card.add("tel")
        line.value = phone.number
        line.type_param = phone.kind.upper()
    for postal in contact.addresses:
        line = card.add("adr")
        line.value = vobject.vcard.Address(street=postal.street, city=postal.city,
                                           region=postal.region, code=postal.postcode,
                                           country=postal.country)
        line.type_param = postal.kind.upper()
    if contact.birthday is not None:
        card.add("bday").value = contact.birthday.isoformat()
    if contact.notes:
        card.add("note").value = contact.notes
    if contact.modified_at is not None:
        card.add("rev").value = contact.modified_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return str(card.serialize()).encode()


def parse(raw: bytes, *, vcard: bool) -> Record:
    return parse_vcard(raw) if vcard else parse_calendar(raw)


def render(record: Record, *, invitations: bool = False) -> bytes:
    if isinstance(record, Contact):
        return render_vcard(record)
    return render_calendar(record, invitations=invitations)
