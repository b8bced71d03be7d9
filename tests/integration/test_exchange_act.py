"""Two-way sync of appointments, contacts and tasks with on-premises Exchange over EWS.

Verified only against `tests.fakes.ews_server`, which stores the items exchangelib sends and
answers SyncFolderItems/GetItem/UpdateItem/DeleteItem in the documented shapes. The ACT job
(services.act) drives `connectors.ews_items.EwsItemStore` with impersonation: creates carry
the UID (calendar ``UID``, an extended property for contacts and tasks) and the tracking
category, only categorized server items come back, a stale ChangeKey is a precondition
failure, and delegation stays refused for appointments, contacts and tasks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

import pytest
from lxml import etree

from serversync import wiring
from serversync.connectors import ews_items
from serversync.connectors.protocols import PreconditionFailed
from serversync.core.act import Appointment, Contact, ItemKind, Phone, Task
from serversync.core.errors import RuleViolation
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


def profile(server: EwsServer, *, impersonation: bool = True) -> Profile:
    return Profile("ex", ServerKind.EXCHANGE, None, credential_source=CredentialSource.PROFILE,
                   service_user=SVC, service_secret=Secret("svc-pw"),
                   use_impersonation=impersonation, ews_url=server.url, allow_plaintext=True)


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


async def test_delegation_is_refused_for_act(db: Database, server: EwsServer) -> None:
    mailbox = Mailbox(BOB, PartyKind.USER, BOB, "ex",
                      act=ChannelState(SyncMethod.SERVER_SIDE, True),
                      approval=ApprovalStatus.APPROVED)
    async with db.transaction() as repo:
        await repo.save_profile(profile(server, impersonation=False))
        await repo.save_mailbox(mailbox)
    before = len(server.requests)
    with pytest.raises(RuleViolation) as caught:
        await ActService(db, wiring.ACT_STORES).sync(BOB)
    assert caught.value.code == "act-on-delegation"
    assert len(server.requests) == before  # refused before any connection
