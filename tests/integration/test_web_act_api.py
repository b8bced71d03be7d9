"""The REST API's appointments, contacts and tasks end to end over ASGI.

Runs on SQLite and PostgreSQL (the ``db`` fixture). CRUD of each kind, bad input answered
with the API's one error format naming the field, the reader role refused for writes, and a
record created through the API reaching the real Radicale when the ACT channel job runs
(test user: carol, her DAV collections only; reset first).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from serversync import wiring
from serversync.connectors import ical
from serversync.core.access import Role
from serversync.core.act import Appointment, ItemKind, content_hash
from serversync.core.model import Channel
from serversync.services import Services
from serversync.services.act import ActJob
from serversync.services.tokens import Tokens
from serversync.store.db import Database
from serversync.web import act_api
from serversync.web.app import create_app
from tests import testservers as ts

CAROL = "carol@example.test"
APPTS, CONTACTS, TASKS = ("/api/v1/activities/appointments", "/api/v1/activities/contacts",
                          "/api/v1/activities/tasks")
FUTURE = (dt.datetime.now(dt.UTC) + dt.timedelta(days=20)).replace(
    hour=8, minute=0, second=0, microsecond=0)


@dataclass
class Api:
    client: httpx.AsyncClient
    admin: str
    reader: str
    services: Services

    async def call(self, method: str, url: str, *, token: str | None = None,
                   expect: int = 200, **kwargs: Any) -> Any:
        response = await self.client.request(
            method, url, headers={"Authorization": f"Bearer {token or self.admin}"}, **kwargs)
        assert response.status_code == expect, (method, url, response.text)
        return response.json() if response.content else None

    async def error(self, method: str, url: str, body: Any, *, expect: int = 422) -> str:
        """The error message of a refused request (checked to be the API's error shape)."""
        found = await self.call(method, url, expect=expect, json=body)
        assert set(found) == {"error"} and set(found["error"]) == {"code", "message", "fix"}
        message: str = found["error"]["message"]
        return message


@pytest.fixture
async def api(db: Database) -> AsyncIterator[Api]:
    services = Services(db, wiring.PROBERS, jobs={Channel.ACT: ActJob(db, wiring.ACT_STORES)})
    tokens = Tokens(db)
    admin = (await tokens.create("admin", Role.ADMIN)).value
    reader = (await tokens.create("reader", Role.READER)).value
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(services)),
                                 base_url="http://api") as client:
        yield Api(client, admin, reader, services)


def meeting(**kw: Any) -> dict[str, Any]:
    return {"uid": "m-1", "owner": CAROL, "subject": "Planning",
            "timezone": "Europe/Berlin", "start": "2026-03-02T09:00:00",
            "end": "2026-03-02T10:00:00", "organizer": CAROL,
            "attendees": [{"address": "Bob@Example.test", "name": "Bob"}],
            "rrule": "FREQ=WEEKLY;COUNT=4", "cancelled_occurrences": ["2026-03-09T09:00:00"],
            "reminder_minutes": 15, "body": "Agenda", **kw}


# ---------------------------------------------------------------- CRUD


async def test_appointments_create_read_change_delete(api: Api) -> None:
    created = await api.call("POST", APPTS, expect=201, json=meeting())
    # times without an offset are read in the appointment's time zone (CET in March)
    assert created["start"] == "2026-03-02T09:00:00+01:00"
    assert created["all_day"] is False and created["attendees"] == [
        {"address": "bob@example.test", "name": "Bob", "role": "required",
         "response": "needs-action"}]
    assert created["cancelled_occurrences"] == ["2026-03-09T09:00:00+01:00"]
    assert created["modified_at"] is not None
    one = await api.call("GET", f"{APPTS}/m-1", token=api.reader)
    assert one == created
    stored = await api.services.jobs[Channel.ACT].service.get(  # type: ignore[attr-defined]
        ItemKind.APPOINTMENT, "m-1")
    assert isinstance(stored, Appointment) and stored.owner == CAROL
    assert stored.start == dt.datetime(2026, 3, 2, 8, tzinfo=dt.UTC)
    # all-day, with a generated UID and an owner written in capitals
    day = await api.call("POST", APPTS, expect=201, json={
        "owner": "Other@Example.test", "subject": "Holiday", "start": "2026-04-06",
        "end": "2026-04-07", "busy": "out-of-office"})
    assert day["all_day"] is True and day["start"] == "2026-04-06" and len(day["uid"]) == 36
    mine = await api.call("GET", f"{APPTS}?owner={CAROL}", token=api.reader)
    assert [a["uid"] for a in mine] == ["m-1"]
    assert len(await api.call("GET", APPTS)) == 2
    assert [a["uid"] for a in await api.call("GET", f"{APPTS}?owner=other@example.test")] == [
        day["uid"]]
    # PATCH lays the given fields over the stored record and validates the whole
    changed = await api.call("PATCH", f"{APPTS}/m-1", json={
        "subject": "Planning (moved)", "start": "2026-03-02T11:00:00Z",
        "end": "2026-03-02T12:30:00Z", "status": "tentative"})
    assert changed["subject"] == "Planning (moved)" and changed["status"] == "tentative"
    assert changed["location"] == "" and changed["rrule"] == "FREQ=WEEKLY;COUNT=4"
    assert changed["attendees"][0]["address"] == "bob@example.test"
    assert changed["start"] == "2026-03-02T11:00:00Z"
    assert (await api.call("GET", f"{APPTS}/m-1"))["subject"] == "Planning (moved)"
    # an end before the new start is caught on the merged record
    assert await api.error("PATCH", f"{APPTS}/m-1", {"start": "2026-03-02T13:00:00Z"}) == \
        "end: is before start"
    assert await api.error("PATCH", f"{APPTS}/m-1", {"uid": "m-2"}) == "uid: cannot be changed"
    assert await api.error("PATCH", f"{APPTS}/m-1", {"colour": "red"}) == "colour: unknown field"
    dup = await api.error("POST", APPTS, meeting())
    assert dup.startswith("uid: a appointment with UID 'm-1' exists")
    await api.call("DELETE", f"{APPTS}/m-1", expect=204)
    await api.call("GET", f"{APPTS}/m-1", expect=404)
    await api.call("PATCH", f"{APPTS}/m-1", expect=404, json={"subject": "x"})
    gone = await api.call("DELETE", f"{APPTS}/m-1", expect=404)
    assert gone["error"]["code"] == "not-found"
    # a UID from a server may hold a slash
    slash = await api.call("POST", APPTS, expect=201, json=meeting(uid="cal/2026/a@b"))
    assert (await api.call("GET", f"{APPTS}/cal%2F2026%2Fa@b"))["uid"] == slash["uid"]
    await api.call("GET", f"{CONTACTS}/{day['uid']}", expect=404)  # another kind's UID


async def test_contacts_create_read_change_delete(api: Api) -> None:
    created = await api.call("POST", CONTACTS, expect=201, json={
        "uid": "c-1", "owner": CAROL, "full_name": "Ann Lee", "given_name": "Ann",
        "family_name": "Lee", "organization": "Acme", "emails": ["ANN@acme.test"],
        "phones": [{"kind": "cell", "number": "+49 170 1"}],
        "addresses": [{"street": "Main St 1", "city": "Berlin", "country": "DE"}],
        "birthday": "1990-05-17"})
    assert created["emails"] == ["ann@acme.test"] and created["birthday"] == "1990-05-17"
    assert created["addresses"][0]["kind"] == "work"
    assert await api.call("GET", f"{CONTACTS}/c-1", token=api.reader) == created
    changed = await api.call("PATCH", f"{CONTACTS}/c-1", json={
        "job_title": "CTO", "phones": []})
    assert changed["job_title"] == "CTO" and changed["phones"] == []
    assert changed["emails"] == ["ann@acme.test"]
    assert [c["uid"] for c in await api.call("GET", f"{CONTACTS}?owner={CAROL}")] == ["c-1"]
    await api.call("DELETE", f"{CONTACTS}/c-1", expect=204)
    assert await api.call("GET", CONTACTS) == []


async def test_tasks_create_read_change_delete(api: Api) -> None:
    created = await api.call("POST", TASKS, expect=201, json={
        "uid": "t-1", "owner": CAROL, "subject": "Send offer", "start": "2026-03-01",
        "due": "2026-03-05", "priority": 3})
    assert created["status"] == "not-started" and created["due"] == "2026-03-05"
    assert await api.call("GET", f"{TASKS}/t-1", token=api.reader) == created
    done = await api.call("PATCH", f"{TASKS}/t-1", json={
        "status": "completed", "percent_complete": 100,
        "completed_at": "2026-03-04T16:00:00+02:00"})
    assert done["status"] == "completed" and done["completed_at"] == "2026-03-04T14:00:00Z"
    assert done["priority"] == 3
    await api.call("DELETE", f"{TASKS}/t-1", expect=204)
    await api.call("GET", f"{TASKS}/t-1", expect=404)


async def test_a_recurring_task_needs_an_anchor(api: Api) -> None:
    weekly = {"uid": "t-2", "owner": CAROL, "subject": "Report", "rrule": "freq=weekly;byday=fr"}
    problem = await api.call("POST", TASKS, expect=422, json=weekly)
    assert "rrule: a recurring task needs a due date or a start" in str(problem)
    created = await api.call("POST", TASKS, expect=201, json={**weekly, "due": "2026-03-06"})
    assert created["rrule"] == "FREQ=WEEKLY;BYDAY=FR"


# ---------------------------------------------------------------- bad input and roles


@pytest.mark.parametrize(("url", "body", "message"), [
    (APPTS, meeting(colour="red"), "colour: unknown field"),
    (APPTS, meeting(start="2026-02-30T09:00:00"), "start: '2026-02-30T09:00:00' is not an ISO "
     "8601 date (2026-01-05) or date-time (2026-01-05T09:00:00+01:00)"),
    (APPTS, meeting(start="tomorrow"), "start: 'tomorrow' is not an ISO"),
    (APPTS, meeting(end="2026-03-02T08:59:00"), "end: is before start"),
    (APPTS, meeting(end="2026-03-02"), "end: must be a date when start is a date"),
    (APPTS, meeting(organizer="carol"), "organizer: 'carol' is not an email address"),
    (APPTS, meeting(attendees=[{"address": "bob@", "name": "Bob"}]),
     "attendees[0].address: 'bob@' is not an email address"),
    (APPTS, meeting(attendees=[{"address": "bob@example.test", "rsvp": True}]),
     "attendees[0].rsvp: unknown field"),
    (APPTS, meeting(timezone="Mars/Olympus"), "timezone: 'Mars/Olympus' is not an IANA"),
    (APPTS, meeting(rrule="EVERY=WEEK"), "rrule: 'EVERY=WEEK' is not an RRULE part"),
    (APPTS, meeting(rrule="", cancelled_occurrences=["2026-03-09"]),
     "cancelled_occurrences: only a recurring appointment"),
    (APPTS, meeting(start="2026-03-02", end="2026-03-03", all_day=False),
     "all_day: a date-only start makes the appointment all-day"),
    (APPTS, meeting(reminder_minutes=-5), "reminder_minutes: Input should be greater"),
    (APPTS, {"owner": CAROL, "start": "2026-03-02", "end": "2026-03-03"},
     "subject: is required"),
    (CONTACTS, {"owner": CAROL, "full_name": "Ann", "emails": ["ann@acme.test", "no-at"]},
     "emails[1]: 'no-at' is not an email address"),
    (CONTACTS, {"owner": CAROL, "full_name": "Ann", "birthday": "1990-13-01"},
     "birthday: Input should be a valid date"),
    (CONTACTS, {"owner": CAROL, "full_name": "Ann", "phones": [{"kind": "pager",
                                                                 "number": "1"}]},
     "phones[0].kind: Input should be"),
    (CONTACTS, {"owner": "", "full_name": "Ann"}, "owner: String should have at least 1"),
    (TASKS, {"owner": CAROL, "subject": "x", "start": "2026-03-05", "due": "2026-03-01"},
     "due: is before start"),
    (TASKS, {"owner": CAROL, "subject": "x", "due": "2026-03-05T09:00:00"},
     "due: needs a UTC offset"),
    (TASKS, {"owner": CAROL, "subject": "x", "due": "next week"}, "due: 'next week' is not"),
    (TASKS, {"owner": CAROL, "subject": "x", "percent_complete": 101},
     "percent_complete: Input should be less than or equal to 100"),
])
async def test_bad_input_names_the_field(api: Api, url: str, body: dict[str, Any],
                                         message: str) -> None:
    found = await api.call("POST", url, expect=422, json=body)
    assert found["error"]["code"] == "config"
    assert found["error"]["message"].startswith(message), found
    assert await api.call("GET", url) == []  # nothing was stored


async def test_every_act_route_needs_a_valid_token_and_readers_only_read(api: Api) -> None:
    # test_web_api's sweep lists the routers it knows by name; these are checked here
    routes = [(method, re.sub(r"\{[^}]+\}", "x", route.path))
              for route in act_api.router.routes if isinstance(route, APIRoute)
              for method in sorted(route.methods or ())]
    assert len(routes) == 17
    for method, path in routes:
        missing = await api.client.request(method, path)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json()["error"]["code"] == "unauthenticated"
        wrong = await api.client.request(method, path,
                                         headers={"Authorization": "Bearer sst_wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "bad-token"
        if method != "GET":
            denied = await api.client.request(
                method, path, json={}, headers={"Authorization": f"Bearer {api.reader}"})
            assert denied.status_code == 403, (method, path, denied.text)
            assert denied.json()["error"]["code"] == "read-only"


async def test_readers_may_only_read(api: Api) -> None:
    await api.call("POST", APPTS, expect=201, json=meeting())
    for method, url in [("POST", APPTS), ("PATCH", f"{APPTS}/m-1"), ("DELETE", f"{APPTS}/m-1"),
                        ("POST", CONTACTS), ("POST", TASKS), ("DELETE", f"{TASKS}/t"),
                        ("PUT", f"/api/v1/mailboxes/{CAROL}/act/filter")]:
        denied = await api.call(method, url, token=api.reader, expect=403,
                                json=meeting(subject="by a reader"))
        assert denied["error"]["code"] == "read-only"
        missing = await api.client.request(method, url, json={})
        assert missing.status_code == 401
    assert (await api.call("GET", f"{APPTS}/m-1", token=api.reader))["subject"] == "Planning"
    await api.call("GET", f"/api/v1/mailboxes/{CAROL}/act/conflicts", expect=404)


# ---------------------------------------------------------------- the ACT job picks it up


def reset_carol() -> None:
    # Radicale serialises writes behind one lock; while other suites sync through it, a
    # DELETE of a whole principal can wait past the helper's 10 s timeout. It is idempotent.
    for attempt in range(3):
        try:
            ts.reset_dav(CAROL)
            return
        except TimeoutError:
            if attempt == 2:
                raise


def carol_items(collection: str) -> dict[str, bytes]:
    """href -> data of every item in one of carol's collections (read as svc)."""
    vcard = collection == "contacts"
    query = "A:addressbook-query" if vcard else "C:calendar-query"
    body = (f'<?xml version="1.0"?><{query} xmlns:D="DAV:" '
            'xmlns:C="urn:ietf:params:xml:ns:caldav" xmlns:A="urn:ietf:params:xml:ns:carddav">'
            f'<D:prop><D:getetag/>{"<A:address-data/>" if vcard else "<C:calendar-data/>"}'
            '</D:prop>' + ("" if vcard else '<C:filter><C:comp-filter name="VCALENDAR"/>'
                                            '</C:filter>') + f'</{query}>')
    status, data = ts.dav_request("REPORT", f"/{CAROL}/{collection}/", body=body,
                                  headers={"Depth": "1", "Content-Type": "application/xml"})
    assert status == 207, data
    out = {}
    for response in re.findall(r"<(?:\w+:)?response>(.*?)</(?:\w+:)?response>", data.decode(),
                               re.S):
        href = re.search(r"<(?:\w+:)?href>([^<]+)<", response)
        content = re.search(r"<(?:\w+:)?(?:calendar|address)-data[^>]*>(.*?)</", response, re.S)
        if href and content:
            out[href.group(1)] = (content.group(1).replace("&#13;", "\r").replace("&lt;", "<")
                                  .replace("&gt;", ">").replace("&amp;", "&").encode())
    return out


def carol_records(collection: str) -> dict[str, Any]:
    return {r.uid: r for r in (ical.parse(raw, vcard=collection == "contacts")
                               for raw in carol_items(collection).values())}


@pytest.mark.servers
@pytest.mark.usefixtures("test_servers")
async def test_created_records_reach_radicale_through_the_act_job(api: Api) -> None:
    reset_carol()
    await api.call("POST", "/api/v1/profiles", expect=201, json={
        "name": "dav", "kind": "imap", "incoming": {"host": ts.HOST, "port": ts.IMAP_PORT},
        "dav_url": ts.DAV_URL, "allow_plaintext": True, "credential_source": "mailbox"})
    await api.call("POST", "/api/v1/directory", json={"kind": "user", "key": "carol",
                                                      "emails": [CAROL]})
    await api.call("POST", "/api/v1/mailboxes", expect=201, json={
        "address": CAROL, "profile": "dav", "owner": "carol", "act": "server-side",
        "allow_credentials": True, "username": CAROL, "secret": ts.USERS[CAROL]})
    await api.call("POST", f"/api/v1/mailboxes/{CAROL}/approve")
    report = await api.call("POST", f"/api/v1/mailboxes/{CAROL}/test-enable")
    assert report["ok"], report
    await api.call("PUT", f"/api/v1/mailboxes/{CAROL}/act/filter", json={"tasks": "open"})

    start = FUTURE.isoformat().replace("+00:00", "Z")
    end = (FUTURE + dt.timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    for uid in ("api-m1", "api-m2"):
        await api.call("POST", APPTS, expect=201, json=meeting(
            uid=uid, start=start, end=end, cancelled_occurrences=[]))
    for uid, name in (("api-c1", "Ann Lee"), ("api-c2", "Bo Berg")):
        await api.call("POST", CONTACTS, expect=201, json={
            "uid": uid, "owner": CAROL, "full_name": name, "emails": ["ann@acme.test"]})
    await api.call("POST", TASKS, expect=201, json={
        "uid": "api-t1", "owner": CAROL, "subject": "Send offer", "due": start})
    summary = await api.services.run_channel(CAROL, Channel.ACT)
    assert (summary.items, summary.failures) == (5, 0), summary
    calendar = carol_records("calendar")
    act = api.services.jobs[Channel.ACT].service  # type: ignore[attr-defined]
    assert set(calendar) == {"api-m1", "api-m2"}
    assert content_hash(calendar["api-m1"]) == content_hash(
        await act.get(ItemKind.APPOINTMENT, "api-m1"))
    assert calendar["api-m1"].timezone == "Europe/Berlin"
    assert set(carol_records("contacts")) == {"api-c1", "api-c2"}
    assert set(carol_records("tasks")) == {"api-t1"}

    # a change and a delete through the API reach the server on the next run (one contact
    # and one appointment stay: a side emptied at once is held back by the sync's safety net)
    await api.call("PATCH", f"{APPTS}/api-m1", json={"subject": "Planning (moved)",
                                                     "location": "Room 2"})
    await api.call("DELETE", f"{CONTACTS}/api-c1", expect=204)
    await api.call("PATCH", f"{TASKS}/api-t1", json={"priority": 1})
    summary = await api.services.run_channel(CAROL, Channel.ACT)
    assert (summary.items, summary.failures) == (3, 0), summary
    moved = carol_records("calendar")["api-m1"]
    assert (moved.subject, moved.location) == ("Planning (moved)", "Room 2")
    assert set(carol_records("contacts")) == {"api-c2"}
    assert carol_records("tasks")["api-t1"].priority == 1
    # nothing left to do: a rerun changes nothing, and nothing was resolved as a conflict
    assert (await api.services.run_channel(CAROL, Channel.ACT)).items == 0
    assert await api.call("GET", f"/api/v1/mailboxes/{CAROL}/act/conflicts",
                          token=api.reader) == []
    await api.call("DELETE", f"{APPTS}/api-m1", expect=204)
    assert (await api.services.run_channel(CAROL, Channel.ACT)).items == 1
    assert set(carol_records("calendar")) == {"api-m2"}
