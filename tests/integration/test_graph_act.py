"""Two-way sync of appointments and contacts with Exchange Online, over the loopback Graph server.

Verified only against `tests.fakes.graph_server`. The ACT job (services.act, the same one
that runs against Radicale) drives `connectors.graph_items.GraphItemStore`: application →
server creates carry our UID in a single-value extended property, server-side changes come
back through the event listing and the contacts delta, server-created items are imported,
deletes propagate both ways, and a stale ETag is refused with 412.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator

import pytest

from serversync import wiring
from serversync.connectors import graph_items
from serversync.connectors.protocols import PreconditionFailed
from serversync.core.act import (
    Appointment,
    Contact,
    ItemKind,
    Phone,
    Task,
    TaskStatus,
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
from tests.fakes.graph_server import GraphServer

APP, SECRET, BOB = "app-act", "act~secret", "bob@contoso.test"
START = (dt.datetime.now(dt.UTC) + dt.timedelta(days=20)).replace(hour=9, minute=0, second=0,
                                                                   microsecond=0)


@pytest.fixture
def server() -> Iterator[GraphServer]:
    fake = GraphServer().start()
    fake.add_app(APP, SECRET)
    fake.add_user(BOB)
    yield fake
    fake.stop()
    assert not fake.http.errors, fake.http.errors


def profile(server: GraphServer) -> Profile:
    return Profile("eo", ServerKind.EXCHANGE_ONLINE, None, credential_source=CredentialSource.APP,
                   tenant_id=server.tenant, client_id=APP, client_secret=Secret(SECRET),
                   token_url=server.token_url, api_url=server.api_url, allow_plaintext=True)


async def make_service(db: Database, server: GraphServer) -> ActService:
    mailbox = Mailbox(BOB, PartyKind.USER, BOB, "eo",
                      act=ChannelState(SyncMethod.SERVER_SIDE, True),
                      approval=ApprovalStatus.APPROVED)
    async with db.transaction() as repo:
        await repo.save_profile(profile(server))
        await repo.save_mailbox(mailbox)
    return ActService(db, wiring.ACT_STORES)


def meeting(uid: str, **kw: object) -> Appointment:
    base = Appointment(uid=uid, subject="Planning", start=START,
                       end=START + dt.timedelta(hours=1), location="Room 1", organizer=BOB,
                       reminder_minutes=15, body="Agenda", owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def person(uid: str, **kw: object) -> Contact:
    base = Contact(uid=uid, full_name="Ann Lee", given_name="Ann", family_name="Lee",
                   organization="Acme", emails=("ann@acme.test",),
                   phones=(Phone("cell", "+49 170 1"),), owner=BOB)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def by_uid(server: GraphServer, collection: str) -> dict[str, dict[str, object]]:
    items = server.users[BOB].collection(collection).items.values()
    return {graph_items._uid(i): i for i in items}


async def test_both_directions_for_appointments_and_contacts(db: Database,
                                                             server: GraphServer) -> None:
    act = await make_service(db, server)
    await act.create(meeting("m-app"))
    await act.create(meeting("m-keep", subject="Review", start=START + dt.timedelta(days=1),
                             end=START + dt.timedelta(days=1, hours=1)))
    await act.create(person("c-app"))
    await act.create(person("c-keep", full_name="Kim Park", emails=("kim@acme.test",)))
    await act.create(Task(uid="t-app", subject="Send offer", due=START, priority=1, owner=BOB))
    await act.create(Task(uid="t-keep", subject="Call back", owner=BOB))
    summary = await act.sync(BOB)
    assert summary.items == 6 and summary.failures == 0, summary
    tasks = by_uid(server, "todo:tasks-default")
    assert {t["title"] for t in tasks.values()} == {"Send offer", "Call back"}
    assert tasks["t-app"]["importance"] == "high"
    assert tasks["t-app"]["extensions"][0]["extensionName"] == graph_items.EXTENSION
    events, contacts = by_uid(server, "events"), by_uid(server, "contacts")
    assert set(events) == {"m-app", "m-keep"} and set(contacts) == {"c-app", "c-keep"}
    assert events["m-app"]["subject"] == "Planning"
    assert events["m-app"]["start"] == {"dateTime": START.strftime("%Y-%m-%dT%H:%M:%S"),
                                        "timeZone": "UTC"}
    posts = [json.loads(r.body) for r in server.requests
             if r.method == "POST" and r.path.endswith("/events")]
    assert sorted(p["singleValueExtendedProperties"][0]["value"] for p in posts) == [
        "m-app", "m-keep"]
    assert all(p["singleValueExtendedProperties"][0]["id"] == graph_items.UID_PROPERTY
               for p in posts)

    assert (await act.sync(BOB)).items == 0  # nothing changed on either side

    # server -> application: a change made in Outlook, and a contact created there
    server.put(BOB, "events", {"subject": "Moved in Outlook"}, str(events["m-app"]["id"]))
    made = server.put(BOB, "contacts", {"displayName": "Bo Outlook", "givenName": "Bo",
                                        "emailAddresses": [{"address": "bo@x.test"}]})
    assert (await act.sync(BOB)).items == 2
    moved = await act.get(ItemKind.APPOINTMENT, "m-app")
    assert moved.subject == "Moved in Outlook"  # type: ignore[union-attr]
    imported = await act.get(ItemKind.CONTACT, str(made["id"]))
    assert isinstance(imported, Contact) and imported.full_name == "Bo Outlook"
    assert imported.owner == BOB

    # application -> server: change and delete
    await act.change(person("c-app", job_title="CTO"))
    await act.delete(ItemKind.APPOINTMENT, "m-app")
    await act.change(Task(uid="t-app", subject="Send offer", due=START, priority=1, owner=BOB,
                          status=TaskStatus.COMPLETED, percent_complete=100))
    assert (await act.sync(BOB)).items == 3
    assert by_uid(server, "todo:tasks-default")["t-app"]["status"] == "completed"
    assert "m-app" not in by_uid(server, "events")
    assert by_uid(server, "contacts")["c-app"]["jobTitle"] == "CTO"
    patches = [r for r in server.requests if r.method == "PATCH"]
    assert patches and all(r.headers.get("if-match", "").startswith('W/"') for r in patches)

    # server -> application: delete
    server.remove(BOB, "contacts", str(by_uid(server, "contacts")["c-app"]["id"]))
    assert (await act.sync(BOB)).items == 1
    assert await act.find(ItemKind.CONTACT, "c-app") is None


async def test_a_stale_etag_is_refused(server: GraphServer) -> None:
    prof = profile(server)
    box = Mailbox(BOB, PartyKind.USER, BOB, "eo")
    login = login_for(prof, box, Channel.ACT)
    async with graph_items.store(prof, login, connect_options(prof)) as store:
        [collection] = (await store.collections([ItemKind.CONTACT])).values()
        written = await store.put(collection, person("c1"), href=None, if_match=None,
                                  invitations=False)
        assert written.hash == content_hash(dataclasses.replace(person("c1"), owner=""))
        server.put(BOB, "contacts", {"jobTitle": "changed elsewhere"},
                   written.href.rsplit("/", 1)[1])
        with pytest.raises(PreconditionFailed):
            await store.put(collection, person("c1", job_title="ours"), href=written.href,
                            if_match=written.etag, invitations=False)
        changes = await store.changes(collection, None)
        assert changes.complete and [h for h, _ in changes.changed] == [written.href]
        [fetched] = await store.get_many(collection, [written.href])
        assert fetched.record is not None and fetched.record.uid == "c1"


async def test_recurring_events_are_quarantined_not_guessed(db: Database,
                                                            server: GraphServer) -> None:
    act = await make_service(db, server)
    server.put(BOB, "events", {"subject": "Weekly", "type": "seriesMaster",
                               "recurrence": {"pattern": {"type": "weekly", "interval": 1}},
                               "start": {"dateTime": "2026-03-02T09:00:00", "timeZone": "UTC"},
                               "end": {"dateTime": "2026-03-02T10:00:00", "timeZone": "UTC"}})
    server.put(BOB, "events", {"subject": "Once",
                               "start": {"dateTime": "2026-03-03T09:00:00", "timeZone": "UTC"},
                               "end": {"dateTime": "2026-03-03T10:00:00", "timeZone": "UTC"}})
    summary = await act.sync(BOB)
    assert summary.items == 1 and summary.failures == 1, summary
