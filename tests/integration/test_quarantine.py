"""The quarantine of incoming mail (`services.quarantine`), on SQLite and PostgreSQL.

Messages get into the quarantine through a real incoming run against Dovecot (delivered by
LMTP, read over IMAP), for two real causes: the database refuses the message (a trigger
that refuses undated email activities, the kind of constraint a DBA adds, and which a
message with an unreadable Date header breaks), and the loop guard. Then the cause is fixed
(the trigger dropped, the sender resumed) and the message retried: exactly one activity,
never a second one — not on a second retry, not on two retries at once, not when the same
Message-ID was tracked meanwhile through another mailbox. The REST API (roles, the .eml
download) and the CLI (output, one-line errors, exit codes) are driven over the same path.
Test users: grace (a user's mailbox) and judy (a queue's); the helpers are test_incoming's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from serversync import wiring
from serversync.cli import app
from serversync.config import Settings
from serversync.core.access import Role
from serversync.core.email import Direction, EmailStatus
from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import Channel
from serversync.core.tracking import LoopPolicy
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.quarantine import Quarantine, RetryResult, quarantine_of
from serversync.services.tokens import Tokens
from serversync.store.db import Database
from serversync.store.incoming import IncomingStore
from serversync.web.app import create_app
from tests import testservers as ts
from tests.integration.test_incoming import (
    DIRECTORY,
    PROFILES,
    activities,
    append,
    job,
    links,
    msg,
    own,
)

pytestmark = pytest.mark.usefixtures("test_servers")

# grace and judy, not test_incoming's alice and support: those are reset by every suite
# that exercises incoming mail; grace and judy only by test_imapsessions and test_test_enable
GRACE, JUDY = "grace@example.test", "judy@example.test"
MINE: list[dict[str, Any]] = [
    {"kind": "user", "key": "grace", "emails": [GRACE]},
    {"kind": "queue", "key": "judy", "emails": [JUDY], "tracking_rule": "all"}]
REFUSAL = "undated email activities are refused here"


@pytest.fixture(autouse=True)
def _clean() -> None:
    for user in (GRACE, JUDY):
        ts.reset_mailbox(user)


async def setup(services: Services, mailboxes: list[dict[str, Any]]) -> None:
    await services.apply(validate(Manifest, {"directory": DIRECTORY + MINE,
                                             "profiles": PROFILES, "mailboxes": mailboxes}))
    async with services.db.transaction() as repo:
        for m in mailboxes:
            await repo.set_channel(m["address"], Channel.INCOMING, enabled=True)


async def refuse_undated(db: Database) -> None:
    """The database refuses email activities without a sent date (a trigger, on both)."""
    async with db.transaction() as repo:
        if repo.session.get_bind().dialect.name == "sqlite":
            await repo.session.execute(text(
                "CREATE TRIGGER refuse_undated BEFORE INSERT ON emails "
                f"WHEN NEW.sent_at IS NULL BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"))
        else:
            await repo.session.execute(text(
                "CREATE FUNCTION refuse_undated() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.sent_at IS NULL THEN RAISE EXCEPTION '{REFUSAL}'; END IF; "
                "RETURN NEW; END $$"))
            await repo.session.execute(text(
                "CREATE TRIGGER refuse_undated BEFORE INSERT ON emails FOR EACH ROW "
                "EXECUTE FUNCTION refuse_undated()"))


async def accept_undated(db: Database) -> None:
    """The cause fixed: the trigger is gone."""
    async with db.transaction() as repo:
        on = "" if repo.session.get_bind().dialect.name == "sqlite" else " ON emails"
        await repo.session.execute(text(f"DROP TRIGGER refuse_undated{on}"))


def undated(to: str, subject: str, message_id: str | None = None) -> bytes:
    """A malformed message: its Date header cannot be read (so it has no sent date)."""
    mid = message_id or email.utils.make_msgid(domain="test.serversync")
    return (f"From: Olga <olga@customer.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: the day after tomorrow, 99:99\r\nMessage-ID: {mid}\r\n\r\n"
            "body\r\n").encode()


async def open_alerts(services: Services, address: str) -> list[str]:
    return [a.code for a in await services.alerts(mailbox=address)]


async def test_refused_message_is_retried_once_the_cause_is_fixed(services: Services,
                                                                  db: Database) -> None:
    await setup(services, [own(GRACE, tracking_rule="all")])
    await refuse_undated(db)
    ts.deliver_lmtp(GRACE, msg(GRACE, "fine"))
    mid = ts.deliver_lmtp(GRACE, undated(GRACE, "no date"))
    summary = await job(db)(GRACE)
    assert (summary.items, summary.failures) == (1, 1)
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=GRACE)
    assert (q.mailbox, q.folder, q.code, q.retries, q.sent) == (GRACE, "INBOX", "store-refused",
                                                                0, False)
    assert REFUSAL in q.reason and q.released_at is None and q.size > 0
    assert "quarantined" in await open_alerts(services, GRACE)
    shown = await quarantine.get(q.id)
    assert shown.headline is not None and shown.headline.subject == "no date"
    assert shown.headline.message_id == mid and shown.email_id is None
    raw = await quarantine.raw(q.id)
    assert raw.endswith(undated(GRACE, "no date", mid)) and len(raw) == q.size

    # not fixed yet: it stays, with the new attempt counted
    again = await quarantine.retry(q.id, by="cli:ops")
    assert (again.outcome, again.code, again.released) == ("quarantined", "store-refused",
                                                          False)
    assert REFUSAL in again.reason
    [q] = await quarantine.messages(mailbox=GRACE)
    assert q.retries == 1 and q.retried_at is not None and q.released_at is None
    assert [o for _, _, o, _ in await links(db, GRACE)] == ["tracked", "quarantined"]

    await accept_undated(db)
    done = await quarantine.retry(q.id, by="cli:ops")
    assert done.outcome == "tracked" and done.email_id is not None and done.released
    found = await activities(db)
    assert [a.message_id for a in found].count(mid) == 1 and len(found) == 2
    tracked = next(a for a in found if a.message_id == mid)
    assert tracked.id == done.email_id and tracked.sent_at is None
    async with db.transaction() as repo:
        [row] = await IncomingStore(repo.session).quarantined(include_released=True)
    assert row.internal_date is not None and tracked.received_at == row.internal_date
    outcomes = {(o, e) for _, _, o, e in await links(db, GRACE)}
    assert ("tracked", done.email_id) in outcomes and "quarantined" not in {o for o, _ in
                                                                            outcomes}
    released = await quarantine.get(q.id)
    assert (released.outcome, released.released_by, released.retries) == ("tracked", "cli:ops",
                                                                           2)
    assert released.released_at is not None and released.email_id == done.email_id
    assert await quarantine.messages(mailbox=GRACE) == []
    assert "quarantined" not in await open_alerts(services, GRACE)  # nothing left: resolved

    # a second retry, and the next sync run, change nothing
    with pytest.raises(RuleViolation) as twice:
        await quarantine.retry(q.id, by="cli:ops")
    assert twice.value.code == "released" and "tracked by cli:ops" in twice.value.message
    assert (await job(db)(GRACE)).items == 0
    assert len(await activities(db)) == 2


async def test_retry_links_to_the_activity_tracked_meanwhile_elsewhere(services: Services,
                                                                      db: Database) -> None:
    await setup(services, [own(GRACE, tracking_rule="all"),
                           own(JUDY, owner="judy", owner_kind="queue",
                               tracking_rule="all")])
    await refuse_undated(db)
    raw = undated(f"{GRACE}, {JUDY}", "to both")
    mid = ts.deliver_lmtp(GRACE, raw)
    assert (await job(db)(GRACE)).failures == 1
    await accept_undated(db)
    ts.deliver_lmtp(JUDY, raw)  # the queue's copy arrives after the fix: tracked there
    assert (await job(db)(JUDY)).items == 1
    [tracked] = await activities(db)
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=GRACE)
    result = await quarantine.retry(q.id, by="api:ops")
    assert (result.outcome, result.email_id) == ("linked", tracked.id)
    assert [a.message_id for a in await activities(db)] == [mid]  # still one activity
    assert [(o, e) for _, _, o, e in await links(db, GRACE)] == [("linked", tracked.id)]


async def test_two_retries_at_once_make_one_activity(services: Services, db: Database) -> None:
    await setup(services, [own(GRACE, tracking_rule="all")])
    await refuse_undated(db)
    ts.deliver_lmtp(GRACE, undated(GRACE, "double click"))
    await job(db)(GRACE)
    await accept_undated(db)
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=GRACE)
    outcomes = await asyncio.gather(quarantine.retry(q.id, by="ui:a"),
                                    quarantine.retry(q.id, by="ui:b"), return_exceptions=True)
    results = [r for r in outcomes if isinstance(r, RetryResult)]
    refused = [r for r in outcomes if isinstance(r, RuleViolation)]
    assert len(results) == 1 and results[0].outcome == "tracked", outcomes
    assert len(refused) == 1 and refused[0].code == "released", outcomes
    assert len(await activities(db)) == 1


async def test_discard_and_retry_a_whole_mailbox(services: Services, db: Database) -> None:
    await setup(services, [own(GRACE, tracking_rule="all")])
    await refuse_undated(db)
    for subject in ("first", "second", "third"):
        ts.deliver_lmtp(GRACE, undated(GRACE, subject))
    assert (await job(db)(GRACE)).failures == 3
    quarantine = quarantine_of(services)
    newest, middle, oldest = await quarantine.messages(mailbox=GRACE)
    assert newest.id > middle.id > oldest.id

    dropped = await quarantine.discard(middle.id, by="ui:ops")
    assert (dropped.outcome, dropped.released_by) == ("discarded", "ui:ops")
    assert dropped.released_at is not None
    assert [q.id for q in await quarantine.messages(mailbox=GRACE)] == [newest.id, oldest.id]
    everything = await quarantine.messages(mailbox=GRACE, include_released=True)
    assert [q.id for q in everything] == [newest.id, middle.id, oldest.id]
    assert [q.id for q in await quarantine.messages(include_released=True, limit=1,
                                                    before_id=newest.id)] == [middle.id]
    assert "quarantined" in await open_alerts(services, GRACE)  # two are left

    await accept_undated(db)
    results = await quarantine.retry_mailbox(GRACE, by="cli:ops")
    assert [(r.id, r.outcome) for r in results] == [(oldest.id, "tracked"),
                                                    (newest.id, "tracked")]
    assert sorted(a.subject for a in await activities(db)) == ["first", "third"]
    assert "quarantined" not in await open_alerts(services, GRACE)
    assert sorted(o for _, _, o, _ in await links(db, GRACE)) == ["quarantined", "tracked",
                                                                  "tracked"]
    assert await quarantine.retry_mailbox(GRACE, by="cli:ops") == []
    for action in (quarantine.discard(middle.id, by="x"), quarantine.retry(middle.id, by="x")):
        with pytest.raises(RuleViolation, match="discarded by ui:ops"):
            await action
    with pytest.raises(NotFound):
        await quarantine.get(middle.id + 1000)
    with pytest.raises(NotFound):
        await quarantine.messages(mailbox="nobody@example.test")


async def test_loop_guard_quarantine_is_retried_after_the_sender_is_resumed(
        services: Services, db: Database) -> None:
    await setup(services, [own(GRACE, tracking_rule="all")])
    policy = LoopPolicy(threshold=2, minutes=120)
    for i in range(3):
        ts.deliver_lmtp(GRACE, msg(GRACE, f"auto reply {i}", sender="robot@loop.test"))
    assert (await job(db, loop=policy)(GRACE)).failures == 1
    quarantine = Quarantine(db, options=job(db, loop=policy).options)
    [q] = await quarantine.messages()
    assert q.code == "loop-guard"
    still = await quarantine.retry(q.id, by="cli:ops")  # the sender is still paused
    assert (still.outcome, still.code) == ("quarantined", "loop-guard")
    async with db.transaction() as repo:
        await IncomingStore(repo.session).resume_sender("robot@loop.test")
    done = await quarantine.retry(q.id, by="cli:ops")
    assert done.outcome == "tracked"
    assert sorted(a.subject for a in await activities(db)) == [f"auto reply {i}"
                                                               for i in range(3)]


async def test_a_sent_folder_message_is_retried_as_outgoing(services: Services,
                                                          db: Database) -> None:
    await setup(services, [own(GRACE, tracking_rule="none", track_sent=True)])
    await refuse_undated(db)
    append(GRACE, "Sent", undated("olga@customer.test", "from my phone").replace(
        b"From: Olga <olga@customer.test>", f"From: Grace <{GRACE}>".encode()))
    assert (await job(db)(GRACE)).failures == 1
    quarantine = quarantine_of(services)
    [q] = await quarantine.messages(mailbox=GRACE)
    assert q.sent is True and q.folder == "Sent"
    await accept_undated(db)
    assert (await quarantine.retry(q.id, by="cli:ops")).outcome == "tracked"
    [sent] = await activities(db)
    assert (sent.direction, sent.status, sent.sender_mailbox) == (Direction.OUTGOING,
                                                                  EmailStatus.SENT, GRACE)
    # the server's arrival date (append() sets it), not the time of the retry
    assert sent.received_at == dt.datetime.fromtimestamp(1.7e9, dt.UTC)


# ---------------------------------------------------------------- REST API


async def quarantine_two(services: Services, db: Database) -> tuple[str, str]:
    """Two undated messages of grace quarantined by a run; the refusal still in place."""
    await setup(services, [own(GRACE, tracking_rule="all")])
    await refuse_undated(db)
    first = ts.deliver_lmtp(GRACE, undated(GRACE, "no date"))
    second = ts.deliver_lmtp(GRACE, undated(GRACE, "also no date"))
    assert (await job(db)(GRACE)).failures == 2
    return first, second


async def test_api_lists_exports_and_only_admins_retry_or_discard(services: Services,
                                                                 db: Database) -> None:
    first_mid, _ = await quarantine_two(services, db)
    tokens = Tokens(db)
    admin = {"Authorization": f"Bearer {(await tokens.create('ops', Role.ADMIN)).value}"}
    reader = {"Authorization": f"Bearer {(await tokens.create('auditor', Role.READER)).value}"}
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        async def call(method: str, url: str, who: dict[str, str], expect: int) -> Any:
            response = await client.request(method, url, headers=who)
            assert response.status_code == expect, (method, url, response.text)
            return response

        listed = (await call("GET", "/api/v1/quarantine", reader, 200)).json()
        second, first = listed  # newest first
        assert (first["mailbox"], first["folder"], first["code"], first["outcome"]) == (
            GRACE, "INBOX", "store-refused", None)
        assert REFUSAL in first["reason"] and first["released_at"] is None
        assert (await call("GET", f"/api/v1/quarantine?mailbox={GRACE}&limit=1", reader,
                           200)).json()[0]["id"] == second["id"]
        missing = await call("GET", "/api/v1/quarantine?mailbox=nobody@example.test", reader,
                             404)
        assert missing.json()["error"]["code"] == "not-found"
        shown = (await call("GET", f"/api/v1/quarantine/{first['id']}", reader, 200)).json()
        assert shown["headline"]["subject"] == "no date"
        assert shown["headline"]["message_id"] == first_mid
        raw = await call("GET", f"/api/v1/quarantine/{first['id']}/raw", reader, 200)
        assert raw.headers["content-type"] == "message/rfc822"
        assert raw.headers["content-disposition"] == (
            f'attachment; filename="quarantine-{first["id"]}.eml"')
        assert raw.content.endswith(undated(GRACE, "no date", first_mid))
        assert len(raw.content) == first["size"]

        for action in ("retry", "discard"):
            denied = await call("POST", f"/api/v1/quarantine/{first['id']}/{action}", reader,
                                403)
            assert denied.json()["error"]["code"] == "read-only"
        await call("POST", f"/api/v1/quarantine/retry?mailbox={GRACE}", reader, 403)

        failed = (await call("POST", f"/api/v1/quarantine/{first['id']}/retry", admin,
                             200)).json()
        assert (failed["released"], failed["outcome"], failed["code"]) == (
            False, "quarantined", "store-refused")
        dropped = (await call("POST", f"/api/v1/quarantine/{second['id']}/discard", admin,
                              200)).json()
        assert (dropped["outcome"], dropped["released_by"]) == ("discarded", "api:ops")
        await accept_undated(db)
        done = (await call("POST", f"/api/v1/quarantine/{first['id']}/retry", admin,
                           200)).json()
        assert (done["released"], done["outcome"]) == (True, "tracked")
        again = await call("POST", f"/api/v1/quarantine/{first['id']}/retry", admin, 409)
        assert again.json()["error"]["code"] == "released"
        await call("POST", f"/api/v1/quarantine/{second['id']}/discard", admin, 409)
        await call("GET", "/api/v1/quarantine/999999", reader, 404)
        assert (await call("POST", f"/api/v1/quarantine/retry?mailbox={GRACE}", admin,
                           200)).json() == []
        emails = (await call("GET", "/api/v1/activities/emails", reader, 200)).json()
        assert [e["id"] for e in emails] == [done["email_id"]]
        assert (await call("GET", "/api/v1/quarantine", reader, 200)).json() == []
        everything = (await call("GET", "/api/v1/quarantine?include_released=true", reader,
                                 200)).json()
        assert [(q["outcome"], q["released_by"]) for q in everything] == [
            ("discarded", "api:ops"), ("tracked", "api:ops")]
        assert everything[1]["retries"] == 2


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("SERVERSYNC_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("SERVERSYNC_KEY_FILE", str(tmp_path / "cli.key"))
    monkeypatch.delenv("SERVERSYNC_SECRET_KEY", raising=False)
    monkeypatch.setenv("USER", "ops")  # getpass: the name recorded as cli:ops
    return Settings.from_env()


def with_services(settings: Settings, work: Callable[[Services, Database], Awaitable[Any]]
                  ) -> Any:
    async def main() -> Any:
        services = await wiring.services(settings)
        try:
            return await work(services, services.db)
        finally:
            await services.db.close()
    return asyncio.run(main())


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_lists_shows_exports_retries_and_discards(cli_env: Settings,
                                                      tmp_path: Path) -> None:
    mid, _ = with_services(cli_env, quarantine_two)
    code, out, err = cli("quarantine", "list", "--json")
    assert code == 0, err
    second, first = json.loads(out)
    code, out, err = cli("quarantine", "list", "--mailbox", GRACE)
    assert code == 0, err
    assert out.splitlines()[0].strip() == "Quarantine"
    for column in ("id", "mailbox", "folder", "size", "code", "reason", "when"):
        assert f" {column} " in out.splitlines()[2], out
    row = next(line for line in out.splitlines() if f" {first['id']} " in line)
    assert GRACE in row and "INBOX" in row and "store-refused" in row
    assert f"{first['size']} B" in row and first["created_at"][:10] in row

    eml = tmp_path / "first.eml"
    code, out, err = cli("quarantine", "show", str(first["id"]), "--raw", str(eml))
    assert code == 0, err
    assert eml.read_bytes().endswith(undated(GRACE, "no date", mid))
    assert "no date" in out and mid in out and f"wrote {first['size']} bytes" in out
    # bad input: one line on stderr, exit 2, nothing overwritten
    for args in (("show", str(first["id"]), "--raw", str(eml)), ("retry",),
                 ("retry", str(first["id"]), "--mailbox", GRACE), ("retry", "abc"),
                 ("discard", "0")):
        code, out, err = cli("quarantine", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, code, out, err)
        assert err.startswith("error: "), err
    assert eml.read_bytes().endswith(undated(GRACE, "no date", mid))

    code, out, err = cli("quarantine", "retry", str(first["id"]))  # not fixed yet
    assert code == 1 and f"✘ {first['id']} {GRACE}: still quarantined (store-refused" in out
    code, out, err = cli("quarantine", "discard", str(second["id"]))
    assert code == 0 and f"discarded {second['id']}" in out and "cli:ops" in out
    with_services(cli_env, lambda _s, db: accept_undated(db))
    code, out, err = cli("quarantine", "retry", "--mailbox", GRACE)
    assert code == 0, err
    assert re.fullmatch(rf"✔ {first['id']} {GRACE}: tracked as email activity \d+\n", out)
    code, out, err = cli("quarantine", "retry", str(first["id"]))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "already left the quarantine: tracked by cli:ops" in err
    code, out, err = cli("quarantine", "show", "999999")
    assert code == 1 and "no quarantined message 999999" in err
    code, out, _ = cli("quarantine", "list")
    assert "nothing in quarantine" in out
    code, out, _ = cli("quarantine", "list", "--all")
    assert "tracked by cli:ops" in out and "discarded by cli:ops" in out
    assert len(with_services(cli_env, lambda _s, db: activities(db))) == 1
