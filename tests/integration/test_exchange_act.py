"""Two-way sync of appointments, contacts and tasks with on-premises Exchange over EWS.

Verified only against `tests.fakes.ews_server`, which stores the items exchangelib sends and
answers SyncFolderItems/GetItem/UpdateItem/DeleteItem in the documented shapes. The ACT job
(services.act) drives `connectors.ews_items.EwsItemStore` with impersonation: creates carry
the UID (calendar ``UID``, an extended property for contacts and tasks) and the tracking
category, only categorized server items come back, and a stale ChangeKey is a precondition
failure. That delegation is refused for appointments, contacts and tasks is part of the
channel contract (`tests/contract/test_act.py`), which runs against this fake too.

Recurring series (the second half): the wire requests are compared with the fixtures under
``tests/fixtures/ews`` (Recurrence, StartTimeZone, OccurrenceItemId), "Outlook" is a second
exchangelib session on the fake, and every series is synced twice to prove that what we
write hashes the same when read back (no sync loop).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from exchangelib import (
    Account,
    CalendarItem,
    Configuration,
    Credentials,
    EWSDate,
    EWSDateTime,
    EWSTimeZone,
)
from exchangelib import Task as EwsTask
from exchangelib.recurrence import (
    AbsoluteMonthlyPattern,
    DailyRegeneration,
    NoEndPattern,
    Recurrence,
    RelativeMonthlyPattern,
    TaskRecurrence,
)
from lxml import etree

from serversync import wiring
from serversync.connectors import ews, ews_items
from serversync.connectors.protocols import PreconditionFailed
from serversync.core.act import (
    Appointment,
    Contact,
    ItemKind,
    Occurrence,
    Phone,
    Record,
    Task,
    as_instant,
    content_hash,
)
from serversync.core.model import (
    ApprovalStatus,
    Channel,
    ChannelState,
    CredentialSource,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
)
from serversync.core.rules import login_for
from serversync.core.secret import Secret
from serversync.services import connect_options
from serversync.services.act import ActService
from serversync.store.db import Database
from tests.fakes.ews_server import EwsServer, M, S, T

SVC, BOB = "svc@corp.test", "bob@corp.test"
START = (dt.datetime.now(dt.UTC) + dt.timedelta(days=20)).replace(hour=9, minute=0, second=0,
                                                                   microsecond=0)


@pytest.fixture
def server() -> Iterator[EwsServer]:
    fake = EwsServer().start()
    fake.add_user(SVC, "svc-pw", mailbox=False)
    fake.add_user(BOB, "bob-pw")
    fake.impersonators.add(SVC)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def profile(server: EwsServer) -> Profile:
    return Profile("ex", ServerKind.EXCHANGE, None, credential_source=CredentialSource.PROFILE,
                   service_user=SVC, service_secret=Secret("svc-pw"),
                   use_impersonation=True, ews_url=server.url, allow_plaintext=True)


async def make_service(db: Database, server: EwsServer) -> ActService:
    mailbox = Mailbox(BOB, PartyKind.USER, BOB, "ex",
                      act=ChannelState(SyncMethod.SERVER_SIDE, True),
                      approval=ApprovalStatus.APPROVED)
    async with db.transaction() as repo:
        await repo.save_profile(profile(server))
        await repo.save_mailbox(mailbox)
    return ActService(db, wiring.ACT_STORES)


def meeting(uid: str, **kw: object) -> Appointment:
    base = Appointment(uid=uid, subject="Planning", start=START,
                       end=START + dt.timedelta(hours=1), location="Room 1", organizer="",
                       reminder_minutes=15, body="Agenda", owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def person(uid: str, **kw: object) -> Contact:
    base = Contact(uid=uid, full_name="Ann Lee", given_name="Ann", family_name="Lee",
                   organization="Acme", emails=("ann@acme.test",),
                   phones=(Phone("cell", "+49 170 1"),), owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def todo(uid: str, **kw: object) -> Task:
    base = Task(uid=uid, subject="Send offer", due=START.date(), priority=1, owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def subjects(server: EwsServer, folder: str) -> dict[str, str]:
    out = {}
    for item in server.folder_items(BOB, folder):
        name = item.element.findtext(f"{{{T}}}Subject") or item.element.findtext(
            f"{{{T}}}DisplayName") or ""
        out[item.id] = name
    return out


async def test_both_directions_for_each_kind(db: Database, server: EwsServer) -> None:
    act = await make_service(db, server)
    for record in (meeting("m-app"), meeting("m-keep", subject="Review"), person("c-app"),
                   person("c-keep", full_name="Kim Park"), todo("t-app"),
                   todo("t-keep", subject="Call back")):
        await act.create(record)
    summary = await act.sync(BOB)
    assert summary.items == 6 and summary.failures == 0, summary
    assert sorted(subjects(server, "calendar").values()) == ["Planning", "Review"]
    assert sorted(subjects(server, "tasks").values()) == ["Call back", "Send offer"]
    creates = [etree.fromstring(r.body) for r in server.requests
               if b"<m:CreateItem" in r.body]
    assert creates and all(
        c.find(f"{{{S}}}Body/{{{M}}}CreateItem").get("MessageDisposition") == "SaveOnly"
        for c in creates)
    calendar_create = next(c for c in creates if c.find(f".//{{{T}}}CalendarItem") is not None)
    op = calendar_create.find(f"{{{S}}}Body/{{{M}}}CreateItem")
    assert op is not None and op.get("SendMeetingInvitations") == "SendToNone"
    assert calendar_create.findtext(f".//{{{T}}}UID") in ("m-app", "m-keep")
    assert all(c.findtext(f".//{{{T}}}Categories/{{{T}}}String") == ews_items.CATEGORY
               for c in creates)
    assert (await act.sync(BOB)).items == 0

    # server -> application: an edit in Outlook; an uncategorized item stays private
    [planning] = [i for i, s in subjects(server, "calendar").items() if s == "Planning"]
    server.change(BOB, planning, "Subject", "Moved in Outlook")
    private = server.deliver(BOB, b"", "private")  # a message in the inbox: not ACT at all
    assert private
    assert (await act.sync(BOB)).items == 1
    moved = await act.get(ItemKind.APPOINTMENT, "m-app")
    assert isinstance(moved, Appointment) and moved.subject == "Moved in Outlook"

    # application -> server: change and delete
    await act.change(person("c-app", job_title="CTO"))
    await act.delete(ItemKind.TASK, "t-app")
    assert (await act.sync(BOB)).items == 2
    assert sorted(subjects(server, "tasks").values()) == ["Call back"]
    updates = [etree.fromstring(r.body) for r in server.requests if b"<m:UpdateItem" in r.body]
    assert updates and all(u.find(f"{{{S}}}Body/{{{M}}}UpdateItem").get("ConflictResolution")
                           == "NeverOverwrite" for u in updates)
    titles = [e.text for e in updates[-1].iter(f"{{{T}}}JobTitle")]
    assert titles == ["CTO"]

    # server -> application: delete
    [kim] = [i for i, s in subjects(server, "contacts").items() if s == "Kim Park"]
    server.remove(BOB, kim)
    assert (await act.sync(BOB)).items == 1
    assert await act.find(ItemKind.CONTACT, "c-keep") is None


async def test_a_stale_change_key_is_refused(server: EwsServer) -> None:
    prof = profile(server)
    box = Mailbox(BOB, PartyKind.USER, BOB, "ex")
    async with ews_items.store(prof, login_for(prof, box, Channel.ACT),
                               connect_options(prof)) as store:
        [collection] = (await store.collections([ItemKind.CONTACT])).values()
        written = await store.put(collection, person("c1"), href=None, if_match=None,
                                  invitations=False)
        server.change(BOB, written.href, "JobTitle", "changed elsewhere")
        with pytest.raises(PreconditionFailed):
            await store.put(collection, person("c1", job_title="ours"), href=written.href,
                            if_match=written.etag, invitations=False)
        changes = await store.changes(collection, None)
        assert changes.complete and [h for h, _ in changes.changed] == [written.href]
        [fetched] = await store.get_many(collection, [written.href])
        assert fetched.record is not None and fetched.record.uid == "c1"
        assert isinstance(fetched.record, Contact) and fetched.record.job_title == \
            "changed elsewhere"


# ---------------------------------------------------------------- recurring series

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ews"
BERLIN = ZoneInfo("Europe/Berlin")
SERIES_START = dt.datetime(2031, 3, 17, 9, 0, tzinfo=BERLIN)  # a Monday; summer time 30 March
WEEK = dt.timedelta(weeks=1)
HOUR = dt.timedelta(hours=1)


def weekly(uid: str, **kw: object) -> Appointment:
    """Mondays 09:00 Berlin, ten times; the 3rd cancelled, the 5th moved to Tuesday 10:00."""
    fifth = SERIES_START + 4 * WEEK
    base = meeting(uid, start=SERIES_START, end=SERIES_START + HOUR,
                   timezone="Europe/Berlin", rrule="FREQ=WEEKLY;BYDAY=MO;COUNT=10",
                   cancelled_occurrences=(SERIES_START + 2 * WEEK,),
                   occurrences=(Occurrence(fifth, fifth + dt.timedelta(days=1, hours=1),
                                           fifth + dt.timedelta(days=1, hours=2),
                                           "Planning (moved)", "Room 2"),))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def fixture_body(name: str) -> etree._Element:
    root = etree.parse(str(FIXTURES / name), etree.XMLParser(remove_blank_text=True)).getroot()
    body = root.find(f"{{{S}}}Body")
    assert body is not None
    return body[0]


def same_xml(sent: etree._Element | None, documented: etree._Element | None) -> bool:
    assert sent is not None and documented is not None
    return bool(etree.tostring(sent, method="c14n") == etree.tostring(documented, method="c14n"))


def sent(server: EwsServer, operation: str, since: int = 0) -> list[etree._Element]:
    """The operation elements (``m:CreateItem`` …) of the requests the fake received."""
    out = []
    for request in server.requests[since:]:
        body = etree.fromstring(request.body, etree.XMLParser(remove_blank_text=True)).find(
            f"{{{S}}}Body")
        if body is not None and len(body) and etree.QName(body[0]).localname == operation:
            out.append(body[0])
    return out


def outlook(server: EwsServer) -> Account:
    """Bob's own EWS session: the changes a user makes in Outlook."""
    config = Configuration(service_endpoint=server.url, credentials=Credentials(BOB, "bob-pw"),
                           auth_type="basic", version=ews.SERVER_VERSION)
    return Account(BOB, config=config, autodiscover=False, access_type="delegate")


async def test_weekly_series_both_ways(db: Database, server: EwsServer) -> None:
    act = await make_service(db, server)
    await act.create(weekly("w1"))
    summary = await act.sync(BOB)
    assert (summary.items, summary.failures) == (1, 0), summary

    # the wire: CreateItem with the series in its own zone, then the two occurrences
    [create] = sent(server, "CreateItem")
    item = create.find(f".//{{{T}}}CalendarItem")
    documented = fixture_body("createitem-recurring-calendaritem-request.xml").find(
        f".//{{{T}}}CalendarItem")
    assert item is not None and documented is not None
    for tag in ("Start", "End", "Recurrence", "StartTimeZone", "EndTimeZone"):
        assert same_xml(item.find(f"{{{T}}}{tag}"), documented.find(f"{{{T}}}{tag}")), tag
    [master] = server.folder_items(BOB, "calendar")
    [delete] = sent(server, "DeleteItem")
    want = fixture_body("deleteitem-occurrence-request.xml")
    assert {k: delete.get(k) for k in want.attrib} == dict(want.attrib)
    [occurrence_id] = delete.iter(f"{{{T}}}OccurrenceItemId")
    assert dict(occurrence_id.attrib) == {"RecurringMasterId": master.id, "InstanceIndex": "3"}
    [update] = sent(server, "UpdateItem")
    want = fixture_body("updateitem-occurrence-request.xml")
    assert update.get("SendMeetingInvitationsOrCancellations") == "SendToNone"
    [change] = update.iter(f"{{{T}}}ItemChange")
    assert dict(change[0].attrib) == {"RecurringMasterId": master.id, "InstanceIndex": "5"}
    fields = {f[0].get("FieldURI"): f for f in change.iter(f"{{{T}}}SetItemField")}
    for documented_field in want.iter(f"{{{T}}}SetItemField"):
        assert same_xml(fields.get(documented_field[0].get("FieldURI")), documented_field)
    assert master.deleted == {3} and set(master.exceptions) == {5}

    # read back: nothing to do, nothing written
    before = len(server.requests)
    assert (await act.sync(BOB)).items == 0
    assert not {"CreateItem", "UpdateItem", "DeleteItem"} & {
        etree.QName(e).localname for e in
        sent(server, "CreateItem", before) + sent(server, "UpdateItem", before)
        + sent(server, "DeleteItem", before)}

    # Outlook: the 7th cancelled, the 8th renamed
    account = outlook(server)
    [series] = account.fetch(ids=[(master.id, None)])
    series.occurrence(7).delete(send_meeting_cancellations="SendToNone")
    eighth = series.occurrence(8)
    eighth.subject = "Planning with guests"
    eighth.save(update_fields=["subject"])
    assert (await act.sync(BOB)).items == 1
    mine = await act.get(ItemKind.APPOINTMENT, "w1")
    assert isinstance(mine, Appointment)
    assert mine.rrule == "FREQ=WEEKLY;BYDAY=MO;COUNT=10" and mine.timezone == "Europe/Berlin"
    assert sorted(as_instant(c) for c in mine.cancelled_occurrences) == [
        as_instant(SERIES_START + 2 * WEEK), as_instant(SERIES_START + 6 * WEEK)]
    renamed = {as_instant(o.recurrence_id): o for o in mine.occurrences}
    eighth_start = SERIES_START + 7 * WEEK
    assert renamed[as_instant(eighth_start)].subject == "Planning with guests"
    assert as_instant(renamed[as_instant(eighth_start)].start) == as_instant(eighth_start)
    assert renamed[as_instant(SERIES_START + 4 * WEEK)].subject == "Planning (moved)"
    assert (await act.sync(BOB)).items == 0

    # the application changes one occurrence: one UpdateItem on that occurrence, nothing else
    fifth = next(o for o in mine.occurrences if o.subject == "Planning (moved)")
    await act.change(dataclasses.replace(mine, occurrences=tuple(
        dataclasses.replace(o, subject="Planning (moved again)") if o is fifth else o
        for o in mine.occurrences)))
    before = len(server.requests)
    assert (await act.sync(BOB)).items == 1
    [update] = sent(server, "UpdateItem", before)
    [change] = update.iter(f"{{{T}}}ItemChange")
    assert change[0].get("InstanceIndex") == "5"
    assert not sent(server, "DeleteItem", before) and not sent(server, "CreateItem", before)
    assert master.exceptions[5].findtext(f"{{{T}}}Subject") == "Planning (moved again)"
    assert master.deleted == {3, 7} and set(master.exceptions) == {5, 8}
    assert (await act.sync(BOB)).items == 0

    # dropping a cancellation in the application sets the pattern again (Exchange cannot
    # restore a single occurrence) and re-applies the rest
    now = await act.get(ItemKind.APPOINTMENT, "w1")
    assert isinstance(now, Appointment)
    await act.change(dataclasses.replace(now, cancelled_occurrences=(SERIES_START + 2 * WEEK,)))
    before = len(server.requests)
    assert (await act.sync(BOB)).items == 1
    assert any(f.get("FieldURI") == "calendar:Recurrence" for u in sent(
        server, "UpdateItem", before) for f in u.iter(f"{{{T}}}FieldURI"))
    assert master.deleted == {3} and set(master.exceptions) == {5, 8}
    assert (await act.sync(BOB)).items == 0


async def test_monthly_last_friday_from_outlook(db: Database, server: EwsServer) -> None:
    act = await make_service(db, server)
    new_york = EWSTimeZone("America/New_York")
    first = EWSDateTime(2031, 1, 31, 9, 30, tzinfo=new_york)  # the last Friday of January
    account = outlook(server)
    series = CalendarItem(
        account=account, folder=account.calendar, subject="Board meeting", start=first,
        end=first + HOUR, categories=[ews_items.CATEGORY], uid="board-1",
        recurrence=Recurrence(pattern=RelativeMonthlyPattern(interval=1, weekday=5,
                                                             week_number=5),
                              boundary=NoEndPattern(start=EWSDate(2031, 1, 31))))
    series.save()
    series.occurrence(2).delete(send_meeting_cancellations="SendToNone")  # 28 February
    summary = await act.sync(BOB)
    assert (summary.items, summary.failures) == (1, 0), summary
    board = await act.get(ItemKind.APPOINTMENT, "board-1")
    assert isinstance(board, Appointment)
    assert board.rrule == "FREQ=MONTHLY;BYDAY=-1FR" and board.timezone == "America/New_York"
    assert [as_instant(c) for c in board.cancelled_occurrences] == [
        dt.datetime(2031, 2, 28, 14, 30, tzinfo=dt.UTC)]
    assert as_instant(board.start) == dt.datetime(2031, 1, 31, 14, 30, tzinfo=dt.UTC)
    assert (await act.sync(BOB)).items == 0

    # a new title in the application: the master only, its pattern and deletion untouched
    await act.change(dataclasses.replace(board, subject="Board meeting (Q1)"))
    before = len(server.requests)
    assert (await act.sync(BOB)).items == 1
    [update] = sent(server, "UpdateItem", before)
    uris = {f.get("FieldURI") for f in update.iter(f"{{{T}}}FieldURI")}
    assert "item:Subject" in uris and "calendar:Recurrence" not in uris
    [stored] = server.folder_items(BOB, "calendar")
    assert stored.deleted == {2}
    assert (await act.sync(BOB)).items == 0


async def test_a_rule_exchange_cannot_store_is_refused_by_name(db: Database,
                                                               server: EwsServer) -> None:
    act = await make_service(db, server)
    await act.create(meeting("biennial", rrule="FREQ=YEARLY;INTERVAL=2"))
    await act.create(meeting("two-weekdays", rrule="FREQ=MONTHLY;BYDAY=1MO,3WE"))
    await act.create(meeting("plain", subject="Review"))
    summary = await act.sync(BOB)
    assert (summary.items, summary.failures) == (1, 2), summary
    assert "FREQ=YEARLY;INTERVAL=2" in summary.detail and "INTERVAL=2 cannot be stored" in \
        summary.detail
    assert "FREQ=MONTHLY;BYDAY=1MO,3WE" in summary.detail
    assert list(subjects(server, "calendar").values()) == ["Review"]
    [create] = sent(server, "CreateItem")
    assert create.find(f".//{{{T}}}Recurrence") is None
    async with db.transaction() as repo:
        refused = sorted(a.message for a in await repo.list_alerts(mailbox=BOB)
                         if a.code == "act-item-refused")
    assert len(refused) == 2 and "biennial" in refused[0] and "two-weekdays" in refused[1]


async def test_recurring_tasks_and_a_regenerating_one(db: Database, server: EwsServer) -> None:
    act = await make_service(db, server)
    friday = dt.date(2031, 3, 21)
    await act.create(todo("weekly-report", subject="Weekly report", due=friday,
                          rrule="FREQ=WEEKLY;BYDAY=FR;COUNT=5"))
    account = outlook(server)
    EwsTask(account=account, folder=account.tasks, subject="Pay rent",
            due_date=EWSDate(2031, 4, 1), categories=[ews_items.CATEGORY],
            recurrence=TaskRecurrence(pattern=AbsoluteMonthlyPattern(interval=1, day_of_month=1),
                                      boundary=NoEndPattern(start=EWSDate(2031, 4, 1)))).save()
    EwsTask(account=account, folder=account.tasks, subject="Water the plants",
            due_date=EWSDate(2031, 4, 3), categories=[ews_items.CATEGORY],
            recurrence=TaskRecurrence(pattern=DailyRegeneration(interval=3),
                                      boundary=NoEndPattern(start=EWSDate(2031, 4, 3)))).save()
    summary = await act.sync(BOB)
    assert (summary.items, summary.failures) == (2, 1), summary

    [create] = [c for c in sent(server, "CreateItem") if c.find(f".//{{{T}}}Task") is not None
                and c.findtext(f".//{{{T}}}Subject") == "Weekly report"]
    recurrence = create.find(f".//{{{T}}}Task/{{{T}}}Recurrence")
    assert recurrence is not None
    assert [etree.QName(e).localname for e in recurrence] == ["WeeklyRecurrence",
                                                              "NumberedRecurrence"]
    assert recurrence.findtext(f"{{{T}}}WeeklyRecurrence/{{{T}}}DaysOfWeek") == "Friday"
    assert recurrence.findtext(f"{{{T}}}NumberedRecurrence/{{{T}}}StartDate") == "2031-03-21"
    assert recurrence.findtext(f"{{{T}}}NumberedRecurrence/{{{T}}}NumberOfOccurrences") == "5"

    tasks = {t.subject: t for t in await act.list_records(ItemKind.TASK, BOB)
             if isinstance(t, Task)}
    assert isinstance(tasks["Pay rent"], Task)
    assert tasks["Pay rent"].rrule == "FREQ=MONTHLY;BYMONTHDAY=1"
    assert tasks["Pay rent"].due == dt.date(2031, 4, 1)
    assert "Water the plants" not in tasks
    async with db.transaction() as repo:
        alerts = [a for a in await repo.list_alerts(mailbox=BOB) if a.code == "act-bad-item"]
    [alert] = alerts
    assert "regenerates 3 day" in alert.message and "iCalendar has no rule" in alert.message
    assert (await act.sync(BOB)).items == 0


async def test_a_written_series_reads_back_with_the_same_hash(server: EwsServer) -> None:
    prof = profile(server)
    box = Mailbox(BOB, PartyKind.USER, BOB, "ex")
    all_day = dt.date(2031, 10, 20)
    records: list[Record] = [
        weekly("rb-weekly"),
        meeting("rb-amsterdam", start=SERIES_START, end=SERIES_START + HOUR,
                timezone="Europe/Amsterdam", rrule="FREQ=DAILY;INTERVAL=2;UNTIL=20310420T070000Z"),
        meeting("rb-all-day", start=all_day, end=all_day, all_day=True,
                timezone="Europe/Berlin", rrule="FREQ=DAILY;COUNT=5",
                cancelled_occurrences=(all_day + dt.timedelta(days=2),)),
        meeting("rb-month-end", start=dt.datetime(2031, 1, 31, 18, tzinfo=BERLIN),
                end=dt.datetime(2031, 1, 31, 19, tzinfo=BERLIN), timezone="Europe/Berlin",
                rrule="FREQ=MONTHLY;BYMONTHDAY=28,29,30,31;BYSETPOS=-1;COUNT=6"),
        meeting("rb-thanksgiving", start=dt.datetime(2031, 11, 27, 12, tzinfo=BERLIN),
                end=dt.datetime(2031, 11, 27, 15, tzinfo=BERLIN), timezone="Europe/Berlin",
                rrule="FREQ=YEARLY;BYMONTH=11;BYDAY=4TH"),
        todo("rb-task", due=dt.date(2031, 3, 21), rrule="FREQ=WEEKLY;INTERVAL=2;BYDAY=FR"),
    ]
    async with ews_items.store(prof, login_for(prof, box, Channel.ACT),
                               connect_options(prof)) as store:
        found = await store.collections([ItemKind.APPOINTMENT, ItemKind.TASK])
        for record in records:
            collection = found[record.kind]
            written = await store.put(collection, record, href=None, if_match=None,
                                      invitations=False)
            [fetched] = await store.get_many(collection, [written.href])
            assert fetched.record is not None, fetched.problem
            assert content_hash(fetched.record) == written.hash, record.uid
            assert fetched.etag == written.etag
            # and written again unchanged: nothing is sent but the reads
            before = len(server.requests)
            again = await store.put(collection, record, href=written.href,
                                    if_match=written.etag, invitations=False)
            assert again.hash == written.hash
            if isinstance(record, Appointment):
                assert again.etag == written.etag
                assert not sent(server, "UpdateItem", before)
    amsterdam = next(i for i in server.folder_items(BOB, "calendar")
                     if i.element.findtext(f"{{{T}}}UID") == "rb-amsterdam")
    assert amsterdam.element.find(f"{{{T}}}StartTimeZone").get(  # type: ignore[union-attr]
        "Id") == "W. Europe Standard Time"


async def test_occurrences_never_become_records_of_their_own(server: EwsServer) -> None:
    prof = profile(server)
    box = Mailbox(BOB, PartyKind.USER, BOB, "ex")
    async with ews_items.store(prof, login_for(prof, box, Channel.ACT),
                               connect_options(prof)) as store:
        [collection] = (await store.collections([ItemKind.APPOINTMENT])).values()
        written = await store.put(collection, weekly("parts"), href=None, if_match=None,
                                  invitations=False)
        changes = await store.changes(collection, None)
        assert [href for href, _ in changes.changed] == [written.href]  # the master only
        [master] = outlook(server).fetch(ids=[(written.href, None)])
        exception_id = master.modified_occurrences[0].id
        plain = master.occurrence(2)
        plain.refresh()  # GetItem on an OccurrenceItemId: an Occurrence of its own id
        assert plain.type == "Occurrence" and exception_id != plain.id
        assert await store.get_many(collection, [exception_id, plain.id]) == []
        [fetched] = await store.get_many(collection, [written.href])
        assert fetched.record is not None and fetched.record.uid == "parts"
