"""IMAP sessions kept between incoming runs, against the real Dovecot (SQLite and PostgreSQL).

Test users: frank and grace (own credentials, STARTTLS). Covers: the second run reuses the
logged-in session (no new LOGIN, no database write for a no-change poll); a cached session
the server closed (``doveadm kick``) — the next run still tracks the new mail, exactly once;
a session that dies unnoticed is retried on a fresh login; a password change invalidates
the kept session; shutdown logs out.
"""

from __future__ import annotations

import email.utils
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event

from serversync import wiring
from serversync.connectors.imap import ImapSource
from serversync.connectors.imapsessions import SessionCache
from serversync.core.errors import AuthError
from serversync.core.model import Channel
from serversync.core.schedule import Outcome
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.incoming import IncomingJob
from serversync.services.runs import ChannelRunner, RunLog
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from tests import testservers as ts

pytestmark = pytest.mark.usefixtures("test_servers")

FRANK, GRACE = "frank@example.test", "grace@example.test"


def manifest(secrets: dict[str, str] | None = None) -> Manifest:
    secrets = secrets or {}
    users = (FRANK, GRACE)
    return validate(Manifest, {
        "directory": [{"kind": "user", "key": u.split("@")[0], "emails": [u]} for u in users],
        "profiles": [{"name": "kept", "kind": "imap", "credential_source": "mailbox",
                      "incoming": {"host": ts.HOST, "port": ts.IMAP_PORT, "tls": "starttls"},
                      "ca_file": str(ts.CA_FILE)}],
        "mailboxes": [{"address": u, "owner": u.split("@")[0], "profile": "kept",
                       "incoming": "server-side", "approval": "approved",
                       "allow_credentials": True, "tracking_rule": "all",
                       "secret": secrets.get(u, ts.password(u))} for u in users]})


def msg(to: str, subject: str) -> bytes:
    return (f"From: Olga <olga@customer.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
            f"Message-ID: {email.utils.make_msgid(domain='kept.serversync')}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n").encode()


def kick(user: str) -> None:
    subprocess.run(["doveadm", "-c", str(ts.DOVECOT_CONF), "kick", user], check=True,
                   capture_output=True, timeout=30)


async def subjects(db: Database) -> list[str]:
    async with db.transaction() as repo:
        return sorted(a.subject for a in await EmailStore(repo.session).list(limit=1000))


@pytest.fixture
async def kept(db: Database) -> AsyncIterator[tuple[Services, IncomingJob]]:
    for user in (FRANK, GRACE):
        ts.reset_mailbox(user)
    services = Services(db, wiring.PROBERS)
    await services.apply(manifest())
    async with db.transaction() as repo:
        for user in (FRANK, GRACE):
            await repo.set_channel(user, Channel.INCOMING, enabled=True)
    job = IncomingJob(db, wiring.INCOMING_SOURCES, sessions=SessionCache())
    yield services, job
    await job.aclose()


def cache(job: IncomingJob) -> SessionCache[Any]:
    assert job.sessions is not None
    return job.sessions


async def test_second_run_reuses_the_session_and_a_no_change_poll_writes_nothing(
        kept: tuple[Services, IncomingJob], db: Database) -> None:
    _, job = kept
    ts.deliver_lmtp(FRANK, msg(FRANK, "one"))
    assert (await job(FRANK)).items == 1
    parked = cache(job)._idle[FRANK].source
    assert isinstance(parked, ImapSource)

    writes: list[str] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writes.append(statement)
    event.listen(db.engine.sync_engine, "before_cursor_execute", on_statement)
    try:
        summary = await job(FRANK)  # no change
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", on_statement)
    assert summary.items == 0 and writes == []
    assert (cache(job).logins, cache(job).reuses) == (1, 1)
    assert cache(job)._idle[FRANK].source is parked  # the very same connection

    ts.deliver_lmtp(FRANK, msg(FRANK, "two"))
    assert (await job(FRANK)).items == 1  # new mail over the kept session
    assert cache(job).logins == 1
    assert await subjects(db) == ["one", "two"]


async def test_a_no_change_run_through_the_runner_is_nine_statements_in_two_transactions(
        kept: tuple[Services, IncomingJob], db: Database) -> None:
    """The bookkeeping budget of a no-change poll (docs/benchmarks.md, "Scale"): read the
    mailbox, settings, profile, schedule and (for the job) the folder cursors; open the
    run; close it. Every run is still recorded, and new mail after it is still found."""
    services, job = kept
    services.jobs[Channel.INCOMING] = job
    runner = ChannelRunner(services)
    ts.deliver_lmtp(FRANK, msg(FRANK, "first"))
    first = await runner.run(FRANK, Channel.INCOMING)
    assert first is not None and first.items == 1

    statements: list[str] = []
    commits: list[None] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    def on_commit(conn: Any) -> None:
        commits.append(None)
    event.listen(db.engine.sync_engine, "before_cursor_execute", on_statement)
    event.listen(db.engine.sync_engine, "commit", on_commit)
    try:
        run = await runner.run(FRANK, Channel.INCOMING)  # no change, on the kept session
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", on_statement)
        event.remove(db.engine.sync_engine, "commit", on_commit)
    assert run is not None and (run.items, run.outcome) == (0, Outcome.SUCCESS)
    assert sorted(statements) == sorted(["SELECT"] * 5 + ["INSERT"] + ["UPDATE"] * 3)
    assert len(commits) == 2
    recent = await RunLog(db).recent(mailbox=FRANK)
    assert [(r.id, r.outcome, r.items) for r in recent[:2]] == [
        (run.id, Outcome.SUCCESS, 0), (first.id, Outcome.SUCCESS, 1)]
    assert recent[0].finished_at == run.finished_at and recent[0].worker == run.worker
    ts.deliver_lmtp(FRANK, msg(FRANK, "second"))
    after = await runner.run(FRANK, Channel.INCOMING)  # the prefetched cursor moved on
    assert after is not None and after.items == 1
    assert await subjects(db) == ["first", "second"]
    assert cache(job).logins == 1


async def test_a_session_the_server_closed_is_replaced_and_no_mail_is_lost(
        kept: tuple[Services, IncomingJob], db: Database) -> None:
    _, job = kept
    ts.deliver_lmtp(GRACE, msg(GRACE, "before"))
    assert (await job(GRACE)).items == 1
    ts.deliver_lmtp(GRACE, msg(GRACE, "while parked"))
    kick(GRACE)  # Dovecot closes the parked session (* BYE, then EOF)
    summary = await job(GRACE)
    assert summary.items == 1
    assert cache(job).logins == 2  # a fresh login replaced the dead session
    assert (await job(GRACE)).items == 0  # nothing tracked twice
    assert await subjects(db) == ["before", "while parked"]


async def test_a_dead_session_that_looks_alive_is_retried_on_a_new_login(
        kept: tuple[Services, IncomingJob], db: Database,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, job = kept
    assert (await job(FRANK)).items == 0
    parked = cache(job)._idle[FRANK].source
    # the connection dies silently (no BYE seen yet): the check at checkout passes
    assert parked.client._writer is not None
    parked.client._writer.transport.abort()
    monkeypatch.setattr(parked, "usable", lambda: True)
    ts.deliver_lmtp(FRANK, msg(FRANK, "after the drop"))
    assert (await job(FRANK)).items == 1  # the run did not fail: retried on a new login
    assert cache(job).logins == 2
    assert await subjects(db) == ["after the drop"]


async def test_a_password_change_invalidates_the_kept_session(
        kept: tuple[Services, IncomingJob], db: Database) -> None:
    services, job = kept
    assert (await job(FRANK)).items == 0
    await services.apply(manifest({FRANK: "not-franks-password"}))
    with pytest.raises(AuthError) as failed:  # a new LOGIN with the new password
        await job(FRANK)
    assert failed.value.code == "auth-failed"
    assert FRANK not in cache(job)._idle and cache(job).dropped == 1
    await services.apply(manifest())
    ts.deliver_lmtp(FRANK, msg(FRANK, "back"))
    assert (await job(FRANK)).items == 1
    assert cache(job).logins == 2  # (the refused login is not counted)


async def test_shutdown_logs_out_every_kept_session(
        kept: tuple[Services, IncomingJob]) -> None:
    _, job = kept
    await job(FRANK)
    await job(GRACE)
    sources = [e.source for e in cache(job)._idle.values()]
    assert len(sources) == 2
    await job.aclose()
    assert len(cache(job)) == 0 and not any(s.usable() for s in sources)
