"""A `serversync worker` process with a fake incoming job, for the worker tests.

``python -m tests.integration.runtime_worker_proc DATABASE_URL`` runs `runtime.worker.Worker`
exactly as ``serversync worker`` does, except that the incoming channel job is `BatchJob`:
it "syncs" ``TOTAL`` numbered items per mailbox in batches, committing each batch's items
and the cursor in one transaction (the contract every real channel job keeps), and records
when each run started and finished and in which process. The tests kill these processes
and read the tables.
"""

from __future__ import annotations

import asyncio
import os
import sys

from sqlalchemy import text

from serversync import wiring
from serversync.core.model import Channel
from serversync.runtime.worker import Worker, WorkerOptions
from serversync.services import RunSummary, Services
from serversync.store.crypto import Keyring, new_key
from serversync.store.db import Database

TOTAL = int(os.environ.get("FAKE_TOTAL", "40"))
BATCH = int(os.environ.get("FAKE_BATCH", "5"))
PAUSE = float(os.environ.get("FAKE_PAUSE", "0.25"))

TABLES = """
CREATE TABLE IF NOT EXISTS fake_items (address text, n int, pid int);
CREATE TABLE IF NOT EXISTS fake_cursor (address text PRIMARY KEY, position int);
CREATE TABLE IF NOT EXISTS fake_spans (id serial PRIMARY KEY, address text, pid int,
    started double precision, finished double precision);
"""


class BatchJob:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, address: str) -> RunSummary:
        async with self.db.transaction() as repo:
            span = (await repo.session.execute(text(
                "INSERT INTO fake_spans (address, pid, started) VALUES (:a, :p, "
                "extract(epoch from clock_timestamp())) RETURNING id"),
                {"a": address, "p": os.getpid()})).scalar_one()
        items = 0
        while True:
            async with self.db.transaction() as repo:
                position = (await repo.session.execute(text(
                    "SELECT position FROM fake_cursor WHERE address = :a"),
                    {"a": address})).scalar_one_or_none() or 0
                if position >= TOTAL:
                    break
                batch = range(position + 1, min(TOTAL, position + BATCH) + 1)
                for n in batch:
                    await repo.session.execute(text(
                        "INSERT INTO fake_items (address, n, pid) VALUES (:a, :n, :p)"),
                        {"a": address, "n": n, "p": os.getpid()})
                await asyncio.sleep(PAUSE)  # the kill lands here, inside the transaction
                await repo.session.execute(text(
                    "INSERT INTO fake_cursor (address, position) VALUES (:a, :n) "
                    "ON CONFLICT (address) DO UPDATE SET position = :n"),
                    {"a": address, "n": batch[-1]})
                items += len(batch)
        if not items:
            await asyncio.sleep(PAUSE)  # a run with nothing new still takes a moment
        async with self.db.transaction() as repo:
            await repo.session.execute(text(
                "UPDATE fake_spans SET finished = extract(epoch from clock_timestamp()) "
                "WHERE id = :i"), {"i": span})
        return RunSummary(items=items, detail=f"pid {os.getpid()}")


async def main(url: str) -> None:
    # The tests' mailboxes carry no secrets, so a throw-away key is enough here.
    db = Database(url, Keyring(new_key()))
    services = Services(db, wiring.PROBERS, jobs={Channel.INCOMING: BatchJob(db)})
    options = WorkerOptions(concurrency=4, dispatch_s=1, stalled_s=3, heartbeat_s=1,
                            grace_s=2, push=False)
    try:
        await Worker(services, url, options=options).run()
    finally:
        await db.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
