"""Two-way sync of appointments, contacts and tasks against the real Radicale.

Users: alice (per-mailbox credentials and impersonation) and bob; svc is the service account.
Server-side edits are made with plain HTTP as svc (tests.testservers.dav_request), the way
another client of the user's calendar would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import zoneinfo
from collections.abc import Sequence

import pytest

from serversync.connectors import dav, ical
from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import (
    FetchedItem,
    ItemChanges,
    ItemCollection,
    WrittenItem,
)
from serversync.core import rules
from serversync.core.act import (
    ActFilter,
    Appointment,
    AppointmentStatus,
    Attendee,
    BusyStatus,
    Contact,
    ContactScope,
    ItemKind,
    Occurrence,
    Phone,
    Task,
    TaskStatus,
    content_hash,
)
from serversync.core.errors import ItemError
from serversync.core.model import (
    ApprovalStatus,
    Channel,
    ChannelState,
    CredentialSource,
    Endpoint,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
)
from serversync.core.secret import Secret
from serversync.services.act import ActService
from serversync.store.act import ActStore
from serversync.store.db import Database
from tests.testservers import DAV_URL, HOST, IMAP_PORT, SVC, USERS, dav_request, reset_dav

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("test_servers")]

ALICE = "alice@example.test"
BOB = "bob@example.test"
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
FUTURE = (NOW + dt.timedelta(days=30)).astimezone(BERLIN).replace(hour=9, minute=0, second=0)


async def make_service(db: Database, user: str, *, impersonation: bool = False,
                       policy: str = "application-wins", remove_unfiltered: bool = False,
                       ) -> ActService:
    reset_dav(user)
    profile = Profile(
        name=f"dav-{user}", kind=ServerKind.IMAP, incoming=Endpoint(HOST, IMAP_PORT),
        dav_url=DAV_URL, allow_plaintext=True, conflict_policy=policy,
        remove_unfiltered=remove_unfiltered,
        credential_source=CredentialSource.PROFILE if impersonation
        else CredentialSource.MAILBOX,
        service_user=SVC if impersonation else None,
        service_secret=Secret(USERS[SVC]) if impersonation else None,
        use_impersonation=impersonation)
    mailbox = Mailbox(address=user, owner_kind=PartyKind.USER, owner=user, profile=profile.name,
                      act=ChannelState(SyncMethod.SERVER_SIDE, True),
                      approval=ApprovalStatus.APPROVED, allow_credentials=True, username=user,
                      secret=Secret(USERS[user]))
    async with db.transaction() as repo:
        await repo.save_profile(profile)
        await repo.save_mailbox(mailbox)
    return ActService(db, {ServerKind.IMAP: dav.store})


def server_items(user: str, collection: str) -> dict[str, bytes]:
    """href -> data of every item in one of ``user``'s collections (as svc)."""
    vcard = collection == "contacts"
    body = (f'<?xml version="1.0"?><{"A:addressbook-query" if vcard else "C:calendar-query"} '
            'xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav" '
            'xmlns:A="urn:ietf:params:xml:ns:carddav"><D:prop><D:getetag/>'
            f'{"<A:address-data/>" if vcard else "<C:calendar-data/>"}</D:prop>'
            + ("" if vcard else '<C:filter><C:comp-filter name="VCALENDAR"/></C:filter>')
            + f'</{"A:addressbook-query" if vcard else "C:calendar-query"}>')
    status, data = dav_request("REPORT", f"/{user}/{collection}/", body=body,
                               headers={"Depth": "1", "Content-Type": "application/xml"})
    assert status == 207, data
    text = data.decode()
    out = {}
    for response in re.findall(r"<(?:\w+:)?response>(.*?)</(?:\w+:)?response>", text, re.S):
        href = re.search(r"<(?:\w+:)?href>([^<]+)<", response)
        content = re.search(r"<(?:\w+:)?(?:calendar|address)-data[^>]*>(.*?)</", response, re.S)
        if href and content:
            raw = content.group(1).replace("&#13;", "\r").replace("&lt;", "<") \
                .replace("&gt;", ">").replace("&amp;", "&")
            out[href.group(1)] = raw.encode()
    return out


def server_records(user: str, collection: str) -> dict[str, object]:
    return {r.uid: r for r in (ical.parse(raw, vcard=collection == "contacts")
                               for raw in server_items(user, collection).values())}


def put_server(user: str, collection: str, name: str, data: bytes) -> None:
    kind = "text/vcard" if collection == "contacts" else "text/calendar"
    status, body = dav_request("PUT", f"/{user}/{collection}/{name}", body=data,
                               headers={"Content-Type": kind})
    assert status in (201, 204), body


def delete_server(user: str, collection: str, uid: str) -> None:
    for href, raw in server_items(user, collection).items():
        if f"UID:{uid}" in raw.decode():
            status, body = dav_request("DELETE", href)
            assert status in (200, 204), body
            return
    raise AssertionError(f"{uid} not on the server")


def meeting(uid: str, owner: str = ALICE, **kw: object) -> Appointment:
    base = Appointment(
        uid=uid, subject="Planning", start=FUTURE, end=FUTURE + dt.timedelta(hours=1),
        timezone="Europe/Berlin", location="Room 1", organizer=owner,
        attendees=(Attendee(BOB, "Bob"),), rrule="FREQ=WEEKLY;COUNT=6",
        cancelled_occurrences=(FUTURE + dt.timedelta(days=7),),
        occurrences=(Occurrence(FUTURE + dt.timedelta(days=14),
                                FUTURE + dt.timedelta(days=14, hours=2),
                                FUTURE + dt.timedelta(days=14, hours=3), "Planning (moved)"),),
        reminder_minutes=15, body="Agenda", owner=owner)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def contact(uid: str, owner: str = ALICE, **kw: object) -> Contact:
    base = Contact(uid=uid, full_name="Ann Lee", given_name="Ann", family_name="Lee",
                   organization="Acme", emails=("ann@acme.test",),
                   phones=(Phone("cell", "+49 170 1"),), owner=owner)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def task(uid: str, owner: str = ALICE, **kw: object) -> Task:
    base = Task(uid=uid, subject="Send offer", due=FUTURE, priority=3, owner=owner)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def ics(record: Appointment | Task) -> bytes:
    return ical.render(record)


# ---------------------------------------------------------------- every direction, both logins


@pytest.mark.parametrize("impersonation", [False, True], ids=["own", "impersonation"])
async def test_every_direction_for_each_kind(db: Database, impersonation: bool) -> None:
    act = await make_service(db, ALICE, impersonation=impersonation)
    # application -> server: create
    for record in (meeting("m-app"), contact("c-app"), task("t-app")):
        await act.create(record)
    summary = await act.sync(ALICE)
    assert summary.items == 3 and summary.failures == 0, summary
    cal, books, tasks = (server_records(ALICE, c) for c in ("calendar", "contacts", "tasks"))
    assert content_hash(cal["m-app"]) == content_hash(await act.get(ItemKind.APPOINTMENT, "m-app"))
    assert content_hash(books["c-app"]) == content_hash(await act.get(ItemKind.CONTACT, "c-app"))
    assert content_hash(tasks["t-app"]) == content_hash(await act.get(ItemKind.TASK, "t-app"))
    assert len(cal["m-app"].occurrences) == 1 and len(cal["m-app"].cancelled_occurrences) == 1

    # server -> application: create
    put_server(ALICE, "calendar", "m-srv.ics", ics(meeting("m-srv", subject="From phone")))
    put_server(ALICE, "contacts", "c-srv.vcf", ical.render(contact("c-srv", full_name="Bo")))
    put_server(ALICE, "tasks", "t-srv.ics", ics(task("t-srv", subject="From phone")))
    assert (await act.sync(ALICE)).items == 3
    imported = await act.get(ItemKind.APPOINTMENT, "m-srv")
    assert imported.owner == ALICE and imported.subject == "From phone"
    assert (await act.get(ItemKind.CONTACT, "c-srv")).full_name == "Bo"
    assert (await act.get(ItemKind.TASK, "t-srv")).subject == "From phone"

    # application -> server: change (a recurrence exception added, a task completed)
    moved = Occurrence(FUTURE + dt.timedelta(days=21), FUTURE + dt.timedelta(days=22),
                       FUTURE + dt.timedelta(days=22, hours=1), "Planning (Thursday)")
    m = await act.get(ItemKind.APPOINTMENT, "m-app")
    assert isinstance(m, Appointment)
    await act.change(dataclasses.replace(m, occurrences=(*m.occurrences, moved),
                                         cancelled_occurrences=(*m.cancelled_occurrences,
                                                                FUTURE + dt.timedelta(days=28))))
    await act.change(contact("c-app", job_title="CTO"))
    await act.change(task("t-app", status=TaskStatus.COMPLETED, percent_complete=100,
                          completed_at=NOW))
    assert (await act.sync(ALICE)).items == 3
    cal = server_records(ALICE, "calendar")
    assert len(cal["m-app"].occurrences) == 2 and len(cal["m-app"].cancelled_occurrences) == 2
    assert server_records(ALICE, "contacts")["c-app"].job_title == "CTO"
    assert server_records(ALICE, "tasks")["t-app"].status is TaskStatus.COMPLETED

    # server -> application: change
    put_server(ALICE, "calendar", "m-srv.ics", ics(meeting("m-srv", subject="Moved by phone",
                                                           location="Room 9")))
    put_server(ALICE, "contacts", "c-srv.vcf", ical.render(contact("c-srv", full_name="Bo B")))
    put_server(ALICE, "tasks", "t-srv.ics", ics(task("t-srv", status=TaskStatus.COMPLETED,
                                                      percent_complete=100, completed_at=NOW)))
    assert (await act.sync(ALICE)).items == 3
    assert (await act.get(ItemKind.APPOINTMENT, "m-srv")).location == "Room 9"
    assert (await act.get(ItemKind.CONTACT, "c-srv")).full_name == "Bo B"
    completed = await act.get(ItemKind.TASK, "t-srv")
    assert isinstance(completed, Task) and completed.is_completed

    # deletes both ways
    await act.delete(ItemKind.APPOINTMENT, "m-app")
    await act.delete(ItemKind.CONTACT, "c-app")
    await act.delete(ItemKind.TASK, "t-app")
    assert (await act.sync(ALICE)).items == 3
    assert "m-app" not in server_records(ALICE, "calendar")
    assert "c-app" not in server_records(ALICE, "contacts")
    assert "t-app" not in server_records(ALICE, "tasks")
    put_server(ALICE, "calendar", "keep.ics", ics(meeting("keep")))
    put_server(ALICE, "contacts", "keep.vcf", ical.render(contact("keep")))
    put_server(ALICE, "tasks", "keep.ics", ics(task("keep")))
    await act.sync(ALICE)
    for collection, uid in (("calendar", "m-srv"), ("contacts", "c-srv"), ("tasks", "t-srv")):
        delete_server(ALICE, collection, uid)
    assert (await act.sync(ALICE)).items == 3
    for kind, uid in ((ItemKind.APPOINTMENT, "m-srv"), (ItemKind.CONTACT, "c-srv"),
                      (ItemKind.TASK, "t-srv")):
        assert await act.find(kind, uid) is None
    # nothing left to do
    again = await act.sync(ALICE)
    assert again.items == 0 and again.failures == 0


# ---------------------------------------------------------------- conflicts


@pytest.mark.parametrize(("policy", "winner"), [("application-wins", "app"),
                                                ("server-wins", "server"),
                                                ("newest-wins", "server")])
async def test_conflict_policies(sqlite_db: Database, policy: str, winner: str) -> None:
    act = await make_service(sqlite_db, ALICE, policy=policy)
    await act.create(contact("c1"))
    await act.create(contact("c2"))
    await act.sync(ALICE)
    await act.change(contact("c1", job_title="app edit"))
    # the server's edit is later (newest-wins): its REV is after the application's change
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    put_server(ALICE, "contacts", "c1.vcf",
               ical.render(contact("c1", job_title="server edit", modified_at=later)))
    await act.sync(ALICE)
    expected = "app edit" if winner == "app" else "server edit"
    assert (await act.get(ItemKind.CONTACT, "c1")).job_title == expected
    assert server_records(ALICE, "contacts")["c1"].job_title == expected
    conflicts = await act.conflicts(ALICE)
    assert [(c.ident, c.winner, c.policy) for c in conflicts] == [
        ("c1", "application" if winner == "app" else "server", policy)]
    assert (await act.sync(ALICE)).items == 0


async def test_completion_survives_a_lost_conflict(sqlite_db: Database) -> None:
    act = await make_service(sqlite_db, ALICE, policy="application-wins")
    await act.create(task("t1"))
    await act.create(task("t2"))
    await act.sync(ALICE)
    await act.change(task("t1", subject="renamed in the app"))
    put_server(ALICE, "tasks", "t1.ics", ics(task("t1", status=TaskStatus.COMPLETED,
                                                  percent_complete=100, completed_at=NOW)))
    await act.sync(ALICE)
    mine = await act.get(ItemKind.TASK, "t1")
    assert isinstance(mine, Task) and mine.is_completed and mine.subject == "renamed in the app"
    theirs = server_records(ALICE, "tasks")["t1"]
    assert theirs.status is TaskStatus.COMPLETED and theirs.subject == "renamed in the app"


# ---------------------------------------------------------------- safety net, crash, bad input


async def test_emptied_server_is_not_mirrored(db: Database) -> None:
    act = await make_service(db, BOB)
    for uid in ("c1", "c2", "c3"):
        await act.create(contact(uid, owner=BOB))
    await act.sync(BOB)
    status, body = dav_request("DELETE", f"/{BOB}/contacts/")  # the whole address book
    assert status in (200, 204), body
    status, body = dav_request("MKCOL", f"/{BOB}/contacts/", body=(
        '<?xml version="1.0"?><D:mkcol xmlns:D="DAV:" xmlns:A="urn:ietf:params:xml:ns:carddav">'
        "<D:set><D:prop><D:resourcetype><D:collection/><A:addressbook/></D:resourcetype>"
        "</D:prop></D:set></D:mkcol>"), headers={"Content-Type": "application/xml"})
    assert status == 201, body
    summary = await act.sync(BOB)
    assert summary.items == 0 and "refused" in summary.detail
    assert len(await act.list_records(ItemKind.CONTACT, BOB)) == 3
    async with db.transaction() as repo:
        alerts = await repo.list_alerts(mailbox=BOB)
    assert [a.code for a in alerts] == ["act-emptied-side"]
    # the administrator confirms: the deletes go through
    assert (await act.sync(BOB, allow_emptied=True)).items == 3
    assert await act.list_records(ItemKind.CONTACT, BOB) == []


async def test_crash_mid_sync_converges_without_duplicates(
        sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    act = await make_service(sqlite_db, BOB)
    for n in range(6):
        await act.create(contact(f"c{n}", owner=BOB, full_name=f"Person {n}"))
    real_put = dav.DavStore.put
    calls = 0

    async def crashing_put(self: dav.DavStore, *args: object, **kwargs: object) -> WrittenItem:
        nonlocal calls
        calls += 1
        if calls > 4:
            raise RuntimeError("power cut")
        return await real_put(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dav.DavStore, "put", crashing_put)
    with pytest.raises(RuntimeError):
        await act.sync(BOB)
    assert len(server_items(BOB, "contacts")) == 4  # written, but never recorded
    monkeypatch.setattr(dav.DavStore, "put", real_put)
    await act.sync(BOB)
    assert sorted(server_records(BOB, "contacts")) == [f"c{n}" for n in range(6)]
    assert len(server_items(BOB, "contacts")) == 6
    async with sqlite_db.transaction() as repo:
        mailbox = await repo.get_mailbox(BOB)
        store = ActStore(repo.session)
        collection = await store.collection(mailbox.id or 0, f"/{BOB}/contacts/",
                                            [ItemKind.CONTACT])
        assert len(await store.status(collection.id)) == 6
    assert (await act.sync(BOB)).items == 0


BAD_ITEMS = {
    "no-uid.ics": b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\n"
                  b"DTSTAMP:20260101T000000Z\r\nDTSTART:20260105T090000Z\r\nSUMMARY:x\r\n"
                  b"END:VEVENT\r\nEND:VCALENDAR\r\n",
    "bad-date.ics": b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:bad-date\r\n"
                    b"DTSTAMP:20260101T000000Z\r\nDTSTART:20261399T250000\r\nSUMMARY:x\r\n"
                    b"END:VEVENT\r\nEND:VCALENDAR\r\n",
}
BAD_TZ = (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:bad-tz\r\n"
          b"DTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Mars/Olympus:20260105T090000\r\n"
          b"SUMMARY:x\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


class InjectingStore(dav.DavStore):
    """Radicale itself refuses (PUT 400, or skips on read) items without a UID, with broken
    dates or with a UID another item already uses, so those come from a server that serves
    them: this store adds them to what the real Radicale lists and returns, parsed by the
    same code path as real items."""

    extra: dict[str, dict[str, bytes]] = {}

    async def changes(self, collection: ItemCollection, token: str | None) -> ItemChanges:
        real = await super().changes(collection, token)
        added = [(collection.href + name, f'"{hash(raw)}"')
                 for name, raw in self.extra.get(collection.href, {}).items()]
        return dataclasses.replace(real, changed=[*real.changed, *added])

    async def get_many(self, collection: ItemCollection,
                       hrefs: Sequence[str]) -> list[FetchedItem]:
        extra = {collection.href + n: raw for n, raw in self.extra.get(collection.href, {}).items()}
        out = await super().get_many(collection, [h for h in hrefs if h not in extra])
        for href in hrefs:
            if href in extra:
                raw = extra[href]
                vcard = ItemKind.CONTACT in collection.kinds
                try:
                    out.append(FetchedItem(href, f'"{hash(raw)}"', raw, ical.parse(raw, vcard=vcard)))
                except ItemError as exc:
                    out.append(FetchedItem(href, f'"{hash(raw)}"', raw, None, exc.message))
        return out


async def test_bad_server_items_are_quarantined_and_the_rest_syncs(db: Database) -> None:
    act = await make_service(db, BOB)
    act.stores[ServerKind.IMAP] = InjectingStore
    InjectingStore.extra = {}
    await act.create(meeting("first", owner=BOB, attendees=()))
    await act.sync(BOB)  # creates the collections
    put_server(BOB, "calendar", "good.ics", ics(meeting("good", owner=BOB)))
    put_server(BOB, "calendar", "bad-tz.ics", BAD_TZ)  # Radicale accepts an unknown TZID
    put_server(BOB, "contacts", "fine.vcf", ical.render(contact("fine", owner=BOB)))
    InjectingStore.extra = {
        f"/{BOB}/calendar/": {**BAD_ITEMS, "dup.ics": ics(meeting("good", owner=BOB,
                                                                  subject="dup"))},
        f"/{BOB}/contacts/": {"nouid.vcf": b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:No Uid\r\n"
                                           b"END:VCARD\r\n"},
    }
    summary = await act.sync(BOB)
    assert summary.failures == 5, summary
    assert (await act.get(ItemKind.APPOINTMENT, "good")).subject == "Planning"
    assert await act.find(ItemKind.CONTACT, "fine") is not None
    assert await act.quarantine_count(BOB) == 5
    async with db.transaction() as repo:
        alerts = await repo.list_alerts(mailbox=BOB)
    assert len([a for a in alerts if a.code == "act-bad-item"]) == 5
    assert any("Mars/Olympus" in a.message for a in alerts)
    # quarantined items are not retried until they change; fixing one releases it
    assert (await act.sync(BOB)).failures == 0
    put_server(BOB, "calendar", "bad-tz.ics", ics(meeting("bad-tz", owner=BOB, attendees=())))
    assert (await act.sync(BOB)).items == 1
    assert await act.quarantine_count(BOB) == 4


# ---------------------------------------------------------------- the reference's rules


async def test_reference_rules(sqlite_db: Database) -> None:
    act = await make_service(sqlite_db, ALICE)
    past = NOW - dt.timedelta(days=60)
    await act.create(meeting("future-mine"))
    await act.create(meeting("future-theirs", organizer=BOB))
    await act.create(meeting("done", status=AppointmentStatus.COMPLETED, rrule="",
                             cancelled_occurrences=(), occurrences=()))
    await act.create(meeting("old", start=past, end=past + dt.timedelta(hours=1), rrule="",
                             cancelled_occurrences=(), occurrences=()))
    await act.create(meeting("old2", start=past, end=past + dt.timedelta(hours=1), rrule="",
                             cancelled_occurrences=(), occurrences=()))
    await act.sync(ALICE)
    raw = {uid: data.decode() for uid, data in
           ((ical.parse(d, vcard=False).uid, d) for d in server_items(ALICE, "calendar").values())}
    unfolded = {uid: text.replace("\r\n ", "").replace("\n ", "") for uid, text in raw.items()}
    assert "SCHEDULE-AGENT=CLIENT" not in unfolded["future-mine"]  # invitations may go
    assert "SCHEDULE-AGENT=CLIENT" in unfolded["future-theirs"]  # not the organiser
    assert "SCHEDULE-AGENT=CLIENT" in unfolded["old"]  # in the past
    done = server_records(ALICE, "calendar")["done"]
    assert done.busy is BusyStatus.FREE and done.reminder_minutes is None
    # deletes of past appointments are not propagated, either way
    delete_server(ALICE, "calendar", "old")
    await act.delete(ItemKind.APPOINTMENT, "old2")
    await act.sync(ALICE)
    assert await act.find(ItemKind.APPOINTMENT, "old") is not None
    assert "old2" in server_records(ALICE, "calendar")
    assert (await act.sync(ALICE)).items == 0


@pytest.mark.parametrize("remove", [False, True], ids=["kept", "removed"])
async def test_leaving_the_sync_filter(sqlite_db: Database, remove: bool) -> None:
    act = await make_service(sqlite_db, ALICE, remove_unfiltered=remove)
    await act.create(contact("mine"))
    await act.create(contact("also-mine"))
    await act.sync(ALICE)
    await act.change(contact("mine", owner=BOB))  # handed over: no longer alice's
    await act.sync(ALICE)
    assert ("mine" in server_records(ALICE, "contacts")) is not remove
    assert (await act.sync(ALICE)).items == 0
    # a filter that excludes contacts stops syncing them altogether
    await act.set_filter(ALICE, ActFilter(contacts=ContactScope.NONE))
    await act.change(contact("also-mine", job_title="not synced"))
    await act.sync(ALICE)
    assert server_records(ALICE, "contacts")["also-mine"].job_title == ""


async def test_ctag_and_etag_fallback_without_sync_tokens(sqlite_db: Database) -> None:
    """A server without RFC 6578: the store lists etags (complete listing) and then answers
    "nothing changed" from the ctag alone; the sync still converges through it."""
    act = await make_service(sqlite_db, BOB)
    await act.create(contact("c1", owner=BOB))
    await act.sync(BOB)
    profile = Profile(name="p", kind=ServerKind.IMAP, incoming=Endpoint(HOST, IMAP_PORT),
                      dav_url=DAV_URL, allow_plaintext=True)
    login = rules.login_for(profile, Mailbox(
        address=BOB, owner_kind=PartyKind.USER, owner=BOB, profile="p", allow_credentials=True,
        username=BOB, secret=Secret(USERS[BOB])), Channel.ACT)
    async with dav.store(profile, login, ConnectOptions()) as store:
        book = (await store.collections([ItemKind.CONTACT]))[ItemKind.CONTACT]
        listing = await store._etag_listing(book, None)
        assert listing.complete and [h for h, _ in listing.changed] == [f"/{BOB}/contacts/c1.vcf"]
        assert listing.token is not None and listing.token.startswith("ctag:")
        same = await store.changes(book, listing.token)
        assert not same.changed and same.token == listing.token
        put_server(BOB, "contacts", "c2.vcf", ical.render(contact("c2", owner=BOB)))
        moved = await store.changes(book, listing.token)
        assert moved.complete and len(moved.changed) == 2 and moved.token != listing.token
