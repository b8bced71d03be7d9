"""The appointments, contacts and tasks (ACT) contract, for every backend.

One ACT job (`services.act`) drives every backend's item store (`wiring.ACT_STORES`): an
application record of each kind reaches the server; a change made on the server, and an
item created there, come back; deletes go both ways; a write carrying a stale etag or
ChangeKey is refused by the server and the conflict is then resolved by the profile's
conflict policy; delegated access is refused (where the backend has delegation); an item the
server holds that cannot be read is quarantined with an alert while the rest syncs.
Recurring items have their own contract in `test_recurrence.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from serversync import wiring
from serversync.connectors.protocols import ItemCollection, WrittenItem
from serversync.core.act import ItemKind, Record
from serversync.core.errors import RuleViolation
from serversync.core.model import Channel
from serversync.manifest import Manifest, validate
from serversync.services.act import ActService, StoreFactory
from tests.contract.backends import Backend, retitled, sample, title

KINDS = (ItemKind.APPOINTMENT, ItemKind.CONTACT, ItemKind.TASK)
TITLES = {ItemKind.APPOINTMENT: "Planning", ItemKind.CONTACT: "Ann Lee",
          ItemKind.TASK: "Send offer"}


async def act_service(backend: Backend, policy: str = "application-wins",
                      stores: dict[Any, StoreFactory] | None = None) -> ActService:
    await backend.setup(Channel.ACT, policy=policy)
    return ActService(backend.db, stores or wiring.ACT_STORES)


def record(backend: Backend, kind: ItemKind, name: str, text: str | None = None) -> Record:
    return sample(kind, f"{name}-{kind.value}", text or TITLES[kind], backend.user)


async def app_title(act: ActService, kind: ItemKind, uid: str) -> str:
    return title(await act.get(kind, uid))


async def test_application_records_reach_the_server(backend: Backend) -> None:
    act = await act_service(backend)
    made = [record(backend, kind, "app") for kind in KINDS]
    for one in made:
        await act.create(one)
    summary = await act.sync(backend.user)
    assert (summary.items, summary.failures) == (3, 0), summary
    for one in made:
        assert backend.items(one.kind) == {one.uid: title(one)}, one.kind
    again = await act.sync(backend.user)
    assert (again.items, again.failures) == (0, 0), again


async def test_server_side_changes_come_back(backend: Backend) -> None:
    act = await act_service(backend)
    for kind in KINDS:
        await act.create(record(backend, kind, "app"))
    await act.sync(backend.user)
    made_there = {}
    for kind in KINDS:
        backend.edit(kind, f"app-{kind.value}", f"Edited there {kind.value}")
        made_there[kind] = backend.create(kind, f"Made there {kind.value}")
    summary = await act.sync(backend.user)
    assert (summary.items, summary.failures) == (6, 0), summary
    for kind in KINDS:
        assert await app_title(act, kind, f"app-{kind.value}") == f"Edited there {kind.value}"
        imported = await act.get(kind, made_there[kind])
        assert title(imported) == f"Made there {kind.value}"
        assert imported.owner == backend.user  # the mailbox's user owns what comes in


async def test_deletes_go_both_ways(backend: Backend) -> None:
    act = await act_service(backend)
    for kind in KINDS:
        for name in ("gone-here", "gone-there", "kept"):
            await act.create(record(backend, kind, name, f"{name} {kind.value}"))
    await act.sync(backend.user)
    for kind in KINDS:
        await act.delete(kind, f"gone-here-{kind.value}")
        backend.remove(kind, f"gone-there-{kind.value}")
    summary = await act.sync(backend.user)
    assert (summary.items, summary.failures) == (6, 0), summary
    for kind in KINDS:
        assert set(backend.items(kind)) == {f"kept-{kind.value}"}, kind
        assert await act.find(kind, f"gone-there-{kind.value}") is None
        assert await act.find(kind, f"kept-{kind.value}") is not None


def racing(backend: Backend, edits: dict[str, str]) -> dict[Any, StoreFactory]:
    """`wiring.ACT_STORES`, but another client edits an item on the server (its title to
    ``edits[uid]``) just after the sync read the server and just before our write of the
    item goes out: the write then carries an etag / ChangeKey that is no longer current."""
    def wrap(factory: StoreFactory) -> StoreFactory:
        @contextlib.asynccontextmanager
        async def opened(*args: Any) -> AsyncIterator[Any]:
            async with factory(*args) as store:
                real: Callable[..., Any] = store.put

                async def put(collection: ItemCollection, item: Record, **kw: Any,
                              ) -> WrittenItem:
                    text = edits.pop(item.uid, None)
                    if text is not None:
                        backend.edit(item.kind, item.uid, text)
                    written: WrittenItem = await real(collection, item, **kw)
                    return written
                store.put = put  # type: ignore[method-assign]
                yield store
        return opened
    return {kind: wrap(factory) for kind, factory in wiring.ACT_STORES.items()}


@pytest.mark.parametrize(("policy", "winner"), [("application-wins", "application"),
                                                ("server-wins", "server")])
async def test_a_stale_etag_is_refused_and_the_policy_decides(backend: Backend, policy: str,
                                                             winner: str) -> None:
    edits: dict[str, str] = {}
    act = await act_service(backend, policy, racing(backend, edits))
    for kind in KINDS:
        await act.create(record(backend, kind, "both"))
    await act.sync(backend.user)
    for kind in KINDS:
        uid = f"both-{kind.value}"
        await act.change(retitled(await act.get(kind, uid), f"App edit {kind.value}"))
        edits[uid] = f"Server edit {kind.value}"

    raced = await act.sync(backend.user)  # every write is refused: the server changed first
    assert not edits, "each write was attempted"
    assert (raced.items, raced.failures) == (0, 0), raced
    for kind in KINDS:
        uid = f"both-{kind.value}"
        assert backend.items(kind)[uid] == f"Server edit {kind.value}"  # not overwritten
        assert await app_title(act, kind, uid) == f"App edit {kind.value}"

    resolved = await act.sync(backend.user)  # both sides changed: a conflict per item
    assert (resolved.items, resolved.failures) == (3, 0), resolved
    expected = "App edit" if winner == "application" else "Server edit"
    for kind in KINDS:
        uid = f"both-{kind.value}"
        assert backend.items(kind)[uid] == f"{expected} {kind.value}"
        assert await app_title(act, kind, uid) == f"{expected} {kind.value}"
    conflicts = await act.conflicts(backend.user)
    assert sorted((c.ident, c.winner, c.policy) for c in conflicts) == sorted(
        (f"both-{kind.value}", winner, policy) for kind in KINDS)


async def test_act_on_delegated_access_is_refused(backend: Backend) -> None:
    if not backend.has_delegation:
        pytest.skip(f"{backend.kind}: no delegated access to refuse; Exchange Online "
                    "profiles are app-only (the seed's rule)")
    directory = [{"kind": "user", "key": backend.user.split("@")[0], "emails": [backend.user]}]
    with pytest.raises(RuleViolation) as refused:  # configuring it is refused ...
        await backend.services.apply(validate(Manifest, {
            "directory": directory, "profiles": backend.profiles("application-wins"),
            "mailboxes": [backend.delegation(backend.user)]}))
    assert refused.value.code == "act-on-delegation" and "impersonation" in refused.value.fix

    # ... and the job checks again: a mailbox stored with ACT on that profile anyway
    act = await act_service(backend)
    await act.create(record(backend, ItemKind.CONTACT, "kept-local"))
    async with backend.db.transaction() as repo:
        mailbox = await repo.get_mailbox(backend.user)
        await repo.save_mailbox(dataclasses.replace(mailbox, profile="deleg"))
    before = backend.requests()
    with pytest.raises(RuleViolation) as caught:
        await act.sync(backend.user)
    assert caught.value.code == "act-on-delegation"
    assert backend.requests() == before  # refused before any connection
    assert backend.items(ItemKind.CONTACT) == {}


async def test_a_broken_server_item_is_quarantined_and_the_rest_syncs(backend: Backend) -> None:
    act = await act_service(backend)
    await act.sync(backend.user)  # the collections exist from here on
    fine = backend.create(ItemKind.APPOINTMENT, "Fine")
    person = backend.create(ItemKind.CONTACT, "Bo Berg")
    words = backend.plant_broken()
    summary = await act.sync(backend.user)
    assert (summary.items, summary.failures) == (2, 1), summary
    assert await app_title(act, ItemKind.APPOINTMENT, fine) == "Fine"
    assert await app_title(act, ItemKind.CONTACT, person) == "Bo Berg"
    assert await act.quarantine_count(backend.user) == 1
    [alert] = [a for a in await backend.services.alerts(mailbox=backend.user)
               if a.code == "act-bad-item"]
    assert words in alert.message and alert.channel is Channel.ACT
    assert "server" in alert.fix
    again = await act.sync(backend.user)  # not read again until it changes
    assert (again.items, again.failures) == (0, 0), again
