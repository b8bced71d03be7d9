"""make bench-outgoing: 1,000 pending emails sent through Postfix into Dovecot.

Measured in one run, same messages, same submission port (Postfix 10025, STARTTLS, AUTH as
bob@example.test), recipient dave@example.test, in this order: raw, SQLite, raw, PostgreSQL,
raw (both databases are filled beforehand); each full path is compared with the mean of the
raw loops just before and after it:

  raw        a tight stdlib smtplib loop over ONE connection, sending the already-built
             bytes: the limit (``shared/reference/test-servers.md`` §9.4). Like with like:
             the same bytes serversync sends (8bit bodies, BODY=8BITMIME), STARTTLS on the
             same port, TCP_NODELAY (asyncio sets it on serversync's sockets); smtplib does
             not pipeline, so it waits for MAIL, RCPT, DATA and the end of data in turn
  sqlite     serversync's full path on SQLite: the outgoing channel job, run until nothing
             is due — claim from the store, build each message, SMTP, copy to the Sent
             folder (IMAP MULTIAPPEND), status commit
  postgres   the same on PostgreSQL

Creating the 1,000 activities through the application API (`OutgoingService.create`) is
timed separately and not part of the full path. Between steps the test users' INBOX and
Sent folder are emptied and Postfix's deliveries are waited for, so no step competes with
the previous one's LMTP deliveries. The corpus: 2-20 KB text bodies, half with an HTML
alternative, a quarter with a 5-20 KB attachment (seed 42). BENCH_QUICK=1 sends 200.
Prints a table with ratios to the adjacent raw loops and ``RESULT`` lines (the raw figure
is the mean of the three loops).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import smtplib
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests import testservers as ts  # noqa: E402

from serversync.core.compose import compose  # noqa: E402
from serversync.core.email import Attachment  # noqa: E402
from serversync.core.model import (  # noqa: E402
    ApprovalStatus,
    ChannelState,
    ChannelStatus,
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
from serversync.core.secret import Secret  # noqa: E402
from serversync.services.outgoing import NewEmail, OutgoingService  # noqa: E402
from serversync.store.crypto import Keyring, new_key  # noqa: E402
from serversync.store.db import Database  # noqa: E402
from serversync.store.emails import EmailStore  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
COUNT = int(os.environ.get("BENCH_MESSAGES", "200" if QUICK else "1000"))
PG_ADMIN = os.environ.get("SERVERSYNC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SENDER, RECIPIENT = "bob@example.test", "dave@example.test"
WORDS = ["order", "invoice", "meeting", "quote", "shipment", "contract", "renewal", "support",
         "ticket", "update", "please", "review", "attached", "thanks", "regards", "Grüße",
         "schedule", "payment", "delivery", "Angebot"]
PROFILE = Profile("bench-own", ServerKind.IMAP,
                  incoming=Endpoint(ts.HOST, ts.IMAP_PORT, TlsMode.STARTTLS),
                  outgoing=Endpoint(ts.HOST, ts.SUBMISSION_PORT, TlsMode.STARTTLS),
                  credential_source=CredentialSource.MAILBOX, ca_file=str(ts.CA_FILE))


def corpus(count: int) -> list[NewEmail]:
    rng = random.Random(42)
    emails = []
    for i in range(count):
        size = rng.randint(2_000, 20_000)
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < size:
            words.append(rng.choice(WORDS))
        text = "\n".join(" ".join(words[j:j + 12]) for j in range(0, len(words), 12)) + "\n"
        html = f"<html><body><p>{text[:4000]}</p></body></html>" if i % 2 else ""
        attachments = [Attachment(f"report-{i}.pdf", "application/pdf", 0,
                                  rng.randbytes(rng.randint(5_000, 20_000)))] if i % 4 == 0 \
            else []
        emails.append(NewEmail(SENDER, f"Bench {i} {rng.choice(WORDS)}", to=[RECIPIENT],
                               text=text, html=html, attachments=attachments))
    return emails


def folder_count(user: str, folder: str) -> int:
    conn = ts.master_login(user)
    try:
        typ, data = conn.status(ts.quote(folder), "(MESSAGES)")
        assert typ == "OK", data
        return int(data[0].split(b"MESSAGES ")[1].rstrip(b")"))
    finally:
        conn.logout()


def wait_count(user: str, folder: str, expected: int, timeout: float = 120.0) -> float:
    start = time.perf_counter()
    while (n := folder_count(user, folder)) < expected:
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"only {n} of {expected} messages reached {user}'s {folder}")
        time.sleep(0.1)
    return time.perf_counter() - start


def clean() -> None:
    for user in (SENDER, RECIPIENT):
        ts.reset_mailbox(user)


async def prepare(url: str) -> tuple[Database, float]:
    db = Database(url, Keyring(new_key()))
    await db.migrate()
    async with db.transaction() as repo:
        await repo.save_profile(PROFILE)
        await repo.save_party(Party(PartyKind.USER, "bob", "Bob Baker", (SENDER,)))
        await repo.save_mailbox(Mailbox(
            SENDER, PartyKind.USER, "bob", PROFILE.name,
            outgoing=ChannelState(SyncMethod.SERVER_SIDE, True, ChannelStatus.SUCCESS),
            allow_credentials=True, username=SENDER, secret=Secret("bob-pw"),
            approval=ApprovalStatus.APPROVED))
    service = OutgoingService(db)
    start = time.perf_counter()
    for new in corpus(COUNT):
        await service.create(new)
    return db, time.perf_counter() - start


async def built_messages(db: Database) -> list[bytes]:
    async with db.transaction() as repo:
        store = EmailStore(repo.session)
        activities = await store.get_many(list(range(1, COUNT + 1)), with_content=True)
    now = dt.datetime.now(dt.UTC)
    # the same bytes serversync sends: Postfix offers 8BITMIME and SMTPUTF8, so non-ASCII
    # bodies travel 8bit (base64 would make the raw loop's messages a third larger)
    return [compose(a, date=now, smtputf8_offered=True, eightbit_offered=True).raw
            for a in activities.values()]


def raw_loop(messages: list[bytes]) -> float:
    start = time.perf_counter()
    with smtplib.SMTP(ts.HOST, ts.SUBMISSION_PORT, timeout=30) as smtp:
        smtp.starttls(context=ts.ssl_context())
        # Without TCP_NODELAY, Nagle + delayed ACK stall every message over ~16 KB by 40 ms
        # on TLS (35 msg/s instead of ~450): the limit is measured without that stall.
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.login(SENDER, "bob-pw")
        for raw in messages:
            smtp.sendmail(SENDER, [RECIPIENT], raw,
                          mail_options=() if raw.isascii() else ("BODY=8BITMIME",))
    return time.perf_counter() - start


async def full_path(db: Database) -> tuple[float, int]:
    service = OutgoingService(db)
    start = time.perf_counter()
    sent, runs = 0, 0
    while True:
        summary = await service(SENDER)
        sent += summary.items
        runs += 1
        if not summary.more:
            break
    elapsed = time.perf_counter() - start
    if sent != COUNT:
        raise SystemExit(f"serversync sent {sent} of {COUNT}")
    return elapsed, runs


def pg_url() -> tuple[str, str]:
    import psycopg

    name = f"serversync_bench_out_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", name


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def measure_raw(messages: list[bytes], raws: list[float]) -> None:
    """One raw-loop measurement, then its deliveries waited for and the mailboxes emptied."""
    raws.append(raw_loop(messages))
    wait_count(RECIPIENT, "INBOX", COUNT)
    clean()


async def main() -> None:
    # Both databases are filled first, so the measurements follow one another within a
    # minute: raw, SQLite, raw, PostgreSQL, raw. Each full path is compared with the mean of
    # the raw loops just before and just after it — on a shared machine whose load moves
    # within a minute, a baseline taken before the minute of creating the PostgreSQL
    # activities (as until 2026-12-05) compared PostgreSQL with a different machine.
    tmp = tempfile.mkdtemp(prefix="bench-outgoing-")
    clean()
    db, create_s = await prepare(f"sqlite:///{tmp}/serversync.db")
    messages = await built_messages(db)
    megabytes = sum(len(m) for m in messages) / 1e6
    pg: tuple[Database, str] | None = None
    try:
        url, name = pg_url()
    except Exception as exc:  # PostgreSQL is optional for this benchmark
        print(f"PostgreSQL skipped: {exc}")
    else:
        try:
            pg = (await prepare(url))[0], name
        except BaseException:
            pg_drop(name)
            raise

    raws: list[float] = []
    rows: list[tuple[str, float, float]] = []  # label, seconds, raw baseline (seconds)
    try:
        await measure_raw(messages, raws)
        sqlite_s, runs = await full_path(db)
        wait_count(RECIPIENT, "INBOX", COUNT)
        if folder_count(SENDER, "Sent") != COUNT:
            raise SystemExit("the Sent folder does not hold one copy of every message")
        clean()
        await measure_raw(messages, raws)
        rows.append((f"serversync full path, SQLite ({runs} runs)", sqlite_s,
                     (raws[0] + raws[1]) / 2))
        if pg is not None:
            postgres_s, runs = await full_path(pg[0])
            wait_count(RECIPIENT, "INBOX", COUNT)
            if folder_count(SENDER, "Sent") != COUNT:
                raise SystemExit("the Sent folder does not hold one copy of every message")
            clean()
            await measure_raw(messages, raws)
            rows.append((f"serversync full path, PostgreSQL ({runs} runs)", postgres_s,
                         (raws[1] + raws[2]) / 2))
    finally:
        await db.close()
        if pg is not None:
            await pg[0].close()
            pg_drop(pg[1])

    print(f"\nOutgoing: {COUNT} messages ({megabytes:.1f} MB) bob -> dave through Postfix "
          f"submission (STARTTLS) into Dovecot; Sent copies over IMAP")
    print(f"(creating the {COUNT} activities through the API: {create_s:.2f} s, "
          f"{COUNT / create_s:.0f}/s; not part of the path below)\n")
    print(f"{'method':<50} {'seconds':>8} {'msg/s':>8} {'vs raw':>7}  baseline")
    for i, seconds in enumerate(raws):
        print(f"{f'raw smtplib loop, 1 connection (#{i + 1})':<50} {seconds:>8.2f} "
              f"{COUNT / seconds:>8.0f}")
    for label, seconds, baseline in rows:
        print(f"{label:<50} {seconds:>8.2f} {COUNT / seconds:>8.0f} "
              f"{baseline / seconds:>6.0%}  raw before and after: {COUNT / baseline:.0f} msg/s")
    print()
    raw_mean = sum(raws) / len(raws)
    print(f"RESULT outgoing_raw_smtplib {COUNT / raw_mean:.0f} msg/s")
    for key, (_, seconds, baseline) in zip(("sqlite", "postgres"), rows, strict=False):
        print(f"RESULT outgoing_serversync_{key} {COUNT / seconds:.0f} msg/s")
        print(f"RESULT outgoing_ratio_{key} {100 * baseline / seconds:.0f} %")


if __name__ == "__main__":
    asyncio.run(main())
