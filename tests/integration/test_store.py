"""The store on SQLite and PostgreSQL: round trips, encryption at rest, uniqueness."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import text

from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import (
    ChannelState,
    CredentialSource,
    Endpoint,
    Mailbox,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
    TlsMode,
)
from serversync.core.secret import Secret
from serversync.store.db import Database

PROFILE = Profile(name="p1", kind=ServerKind.IMAP, incoming=Endpoint("imap.example.com", 993),
                  outgoing=Endpoint("smtp.example.com", 587, TlsMode.STARTTLS),
                  credential_source=CredentialSource.PROFILE, service_user="svc@example.com",
                  service_secret=Secret("s3cret-svc"), use_impersonation=True,
                  impersonation_scope=("@example.com",))


async def test_profile_and_mailbox_round_trip(db: Database) -> None:
    async with db.transaction() as repo:
        saved = await repo.save_profile(PROFILE)
        await repo.save_party(Party(PartyKind.USER, "alice", "Alice", ("alice@example.com",)))
        await repo.save_mailbox(Mailbox("alice@example.com", PartyKind.USER, "alice", "p1",
                                        incoming=ChannelState(SyncMethod.SERVER_SIDE),
                                        secret=Secret("own-pw")))
    assert saved.id is not None
    async with db.transaction() as repo:
        profile = await repo.get_profile("p1")
        mailbox = await repo.get_mailbox("ALICE@example.com ")
    assert dataclasses.replace(profile, id=None) == PROFILE
    assert mailbox.secret == Secret("own-pw")
    assert mailbox.incoming.method is SyncMethod.SERVER_SIDE


async def test_secrets_are_encrypted_at_rest(db: Database) -> None:
    async with db.transaction() as repo:
        await repo.save_profile(PROFILE)
        raw = (await repo.session.execute(text("SELECT service_secret FROM profiles"))).scalar_one()
    assert "s3cret-svc" not in raw
    assert raw.startswith(f"v1:{db.keyring.primary_id}:")


async def test_profile_with_mailboxes_cannot_be_deleted(db: Database) -> None:
    async with db.transaction() as repo:
        await repo.save_profile(PROFILE)
        await repo.save_mailbox(Mailbox("bob@example.com", PartyKind.USER, "bob", "p1"))
    with pytest.raises(RuleViolation, match="bob@example.com"):
        async with db.transaction() as repo:
            await repo.delete_profile("p1")
    async with db.transaction() as repo:
        assert await repo.find_profile("p1") is not None


async def test_failed_transaction_writes_nothing(db: Database) -> None:
    with pytest.raises(NotFound):
        async with db.transaction() as repo:
            await repo.save_profile(PROFILE)
            await repo.save_mailbox(Mailbox("x@example.com", PartyKind.USER, "x", "missing"))
    async with db.transaction() as repo:
        assert await repo.list_profiles() == []


async def test_directory_resolution_by_address(db: Database) -> None:
    async with db.transaction() as repo:
        await repo.save_party(Party(PartyKind.CONTACT, "c1", "Dana", ("dana@x.example",)))
        await repo.save_party(Party(PartyKind.LEAD, "l1", "Dana (lead)", ("Dana@x.example",)))
        await repo.save_party(Party(PartyKind.CONTACT, "c1", "Dana", ("dana@x.example",
                                                                      "d2@x.example")))
        found = await repo.parties_by_address(["DANA@x.example", "nobody@x.example"])
    assert sorted(p.kind.value for p in found["dana@x.example"]) == ["contact", "lead"]
    assert found["nobody@x.example"] == []


async def test_email_activity_round_trip_with_shared_blobs(db: Database) -> None:
    from serversync.core.email import (
        Attachment,
        Direction,
        EmailActivity,
        EmailStatus,
        Recipient,
        Role,
    )
    from serversync.store.emails import EmailStore

    pdf = b"%PDF-1.4 " + bytes(range(256)) * 40
    activity = EmailActivity(
        Direction.INCOMING, EmailStatus.RECEIVED, "Quote", "dana@x.example",
        recipients=(Recipient(Role.TO, "Alice@Example.com", "Alice", "user", "alice"),),
        message_id="<m1@x.example>", references=("<m0@x.example>",),
        attachments=(Attachment("q.pdf", "application/pdf", len(pdf), pdf),
                     Attachment("big.bin", "application/octet-stream", 60_000_000,
                                notice="larger than the limit; not stored")))
    async with db.transaction() as repo:
        emails = EmailStore(repo.session)
        first = await emails.add(activity)
        await emails.add(activity)  # same attachment again: one blob
        blobs = (await repo.session.execute(text("SELECT count(*) FROM blobs"))).scalar_one()
    assert blobs == 1
    async with db.transaction() as repo:
        emails = EmailStore(repo.session)
        assert first.id is not None
        loaded = await emails.get(first.id, with_content=True)
        assert await emails.ids_by_message_ids(["<m1@x.example>"]) == {"<m1@x.example>": first.id}
        assert await emails.set_status(first.id, EmailStatus.SENT, expected=EmailStatus.RECEIVED)
        assert not await emails.set_status(first.id, EmailStatus.SENT, expected=EmailStatus.RECEIVED)
    assert loaded.attachments[0].content == pdf
    assert loaded.attachments[1].content is None and "limit" in loaded.attachments[1].notice
    assert loaded.recipients[0].address == "alice@example.com"
    assert dataclasses.replace(loaded, id=None, created_at=activity.created_at,
                               attachments=activity.attachments,
                               recipients=activity.recipients) == activity
