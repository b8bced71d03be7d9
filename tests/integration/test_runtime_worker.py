"""`serversync worker` on PostgreSQL: takeover after a kill, and one run per channel at once.

Real worker processes (`tests.integration.runtime_worker_proc`: the production `Worker` with
a fake batch job) share a fresh PostgreSQL database cloned from the migrated template.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from serversync import wiring
from serversync.core.model import Channel
from serversync.core.schedule import Outcome
from serversync.runtime.worker import Worker, channel_lock, install_schema
from serversync.services import Services
from serversync.services.runs import RunLog
from serversync.store.crypto import Keyring, new_key
from serversync.store.db import Database
from tests.conftest import _pg_admin, _pg_url
from tests.integration.runtime_worker_proc import TABLES
from tests.integration.test_runtime_scheduler import seed

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def pg(pg_template: str) -> AsyncIterator[tuple[str, Database]]:
    name = f"serversync_w_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    url = _pg_url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TABLES)  # type: ignore[arg-type]
    database = Database(url, Keyring(new_key()))
    try:
        yield url, database
    finally:
        await database.close()
        with _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start_worker(url: str, started: list[subprocess.Popen[bytes]], **env: str
                 ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.runtime_worker_proc", url], cwd=REPO,
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started.append(proc)
    return proc


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]


async def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_killed_worker_mid_job_is_taken_over_without_duplicates(
        pg: tuple[str, Database], workers: list[subprocess.Popen[bytes]]) -> None:
    url, db = pg
    [box] = await seed(db, 1, secret=None)
    first = start_worker(url, workers)
    second = start_worker(url, workers)

    def items() -> int:
        return int(query(url, "SELECT coalesce(max(position), 0) FROM fake_cursor"
                         )[0][0])  # type: ignore[call-overload]
    await wait_for(lambda: items() >= 10, 40, "the first batches")
    [(victim_pid,)] = query(url, "SELECT pid FROM fake_spans")
    victim = first if first.pid == victim_pid else second
    victim.send_signal(signal.SIGKILL)  # no cleanup, mid-transaction
    victim.wait(10)
    await wait_for(lambda: items() >= 40, 40, "the other worker to finish the channel")
    await wait_for(lambda: query(url, "SELECT count(*) FROM sync_runs WHERE outcome = 'success'"
                                 )[0][0], 10, "the run to be recorded")
    rows = query(url, "SELECT n, count(*) FROM fake_items GROUP BY n ORDER BY n")
    assert [n for n, _ in rows] == list(range(1, 41))  # nothing lost
    assert all(count == 1 for _, count in rows)  # nothing duplicated
    pids = {pid for (pid,) in query(url, "SELECT DISTINCT pid FROM fake_items")}
    assert pids == {first.pid, second.pid}
    runs = await RunLog(db).recent(mailbox=box)
    outcomes = [(r.outcome, r.error_code) for r in reversed(runs)]
    assert outcomes[0] == (Outcome.TRANSIENT, "interrupted")  # the killed worker's run
    assert (Outcome.SUCCESS, None) in outcomes[1:]
    survivor = second if victim is first else first
    assert survivor.poll() is None
    survivor.send_signal(signal.SIGTERM)  # graceful stop
    assert survivor.wait(20) == 0, survivor.stderr.read() if survivor.stderr else ""


async def test_two_workers_never_run_the_same_channel_at_once(
        pg: tuple[str, Database], workers: list[subprocess.Popen[bytes]]) -> None:
    url, db = pg
    boxes = await seed(db, 2, min_poll=0, secret=None)  # always due: the dispatcher keeps queueing
    env = {"FAKE_TOTAL": "0", "FAKE_PAUSE": "0.15"}  # every run takes a moment
    first, second = start_worker(url, workers, **env), start_worker(url, workers, **env)

    # Queue many more runs than the queueing lock would allow: only the lock protects now.
    await install_schema(url)  # the workers may still be starting
    pusher = Worker(Services(db, wiring.PROBERS), url)
    async with pusher.app.open_async():
        for _ in range(10):
            for box in boxes:
                await pusher.sync_task.configure(lock=channel_lock(box, Channel.INCOMING)
                                                 ).defer_async(address=box, channel="incoming")

    def spans() -> int:
        return int(query(url, "SELECT count(*) FROM fake_spans WHERE finished IS NOT NULL"
                         )[0][0])  # type: ignore[arg-type]
    await wait_for(lambda: spans() >= 24, 60, "two dozen runs")
    for box in boxes:
        rows = query(url, f"SELECT started, finished, pid FROM fake_spans WHERE address = '{box}' "
                          "AND finished IS NOT NULL ORDER BY started")
        assert len(rows) >= 5
        for (_, end, _), (start, _, _) in itertools.pairwise(rows):
            assert start >= end, f"{box}: a run started before the previous one ended"
    pids = {pid for (pid,) in query(url, "SELECT DISTINCT pid FROM fake_spans")}
    assert pids == {first.pid, second.pid}  # both worked, on the same channels


async def test_dispatch_queues_each_due_channel_once_in_batches(
        pg: tuple[str, Database], monkeypatch: pytest.MonkeyPatch) -> None:
    url, db = pg
    boxes = await seed(db, 7, min_poll=0, secret=None)
    await install_schema(url)
    monkeypatch.setattr("serversync.runtime.worker.DISPATCH_BATCH", 3)  # 3 + 3 + 1
    dispatcher = Worker(Services(db, wiring.PROBERS), url)
    async with dispatcher.app.open_async():
        # one already waits (a push queued it): left out of the batch, not queued twice
        assert await dispatcher.defer(boxes[0], Channel.INCOMING)
        assert await dispatcher.dispatch() == 6
        assert await dispatcher.dispatch() == 0  # all still waiting: nothing new
    rows = query(url, "SELECT queueing_lock, lock, args->>'address', status "
                      "FROM procrastinate_jobs ORDER BY id")
    assert sorted(r[0] for r in rows) == sorted(channel_lock(b, Channel.INCOMING) for b in boxes)
    assert all(r[0] == r[1] and r[0] == f"{r[2]}/incoming" and r[3] == "todo" for r in rows)
