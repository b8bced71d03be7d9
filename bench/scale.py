"""make bench-scale: 1,000 mailboxes on Dovecot — poll cycle, push latency, memory, workers.

Mailboxes bench0001..bench1000@example.test (BENCH_QUICK=1: 100) are added to the RUNNING
test Dovecot's passwd-file (``/srv/serversync-test/dovecot/users``, then ``doveadm reload``);
and to Postfix's ``vmailbox`` (then ``postfix reload``); each logs in with its own
password over STARTTLS, like a per-mailbox-credentials profile.
The real incoming job (`services.incoming`, wired by `serversync.wiring`) does the syncing.

Steps:

1. **serve (SQLite, one process)**: initial sync of every mailbox, then
   * one *no-change poll cycle*: every incoming channel made due at once, time until all have
     run again (100 runs at once; IMAP sessions kept between runs, as ``serve`` does: with
     the mailboxes' own credentials the profile's connection cap counts per mailbox); then
     the same cycle after the kept sessions were closed
     (every run logs in: the cold figure);
     baseline: the same no-change sync of 20 mailboxes run one after another, scaled to N;
   * *push*: IMAP IDLE on every mailbox (`runtime.push`); memory per idle mailbox is this
     process's RSS growth after all watchers are connected, divided by N;
   * *delivery → tracked* latency: 50 messages (QUICK: 20) sent through Postfix's MX port to
     random mailboxes, 0.2 s apart; tracked = the email activity row exists (polled every
     20 ms). Baseline: Postfix → Dovecot delivery alone (message visible over IMAP).
2. **two workers (PostgreSQL)**: the same mailboxes in a fresh PostgreSQL database, two
   ``serversync worker`` processes; the no-change cycle (all channels due at once → all ran
   again), the delivery → tracked latency and the workers' RSS per mailbox.

Prints a table and ``RESULT`` lines. Targets (issue 6): p99 delivery → tracked < 5 s with
push; 1,000-mailbox no-change cycle < 10 s on 2 cores; < 1 MiB per idle mailbox.

``BENCH_SCALE_IDLE=10000`` runs only the *idle* step instead, with that many mailboxes
(BENCH_QUICK=1 caps it at 300): `serve` on SQLite as in step 1 with its default bound of
1,000 kept IMAP sessions — initial sync, the no-change cycle (kept sessions for 1,000, a
login for the rest), then IMAP IDLE on every mailbox: memory per idle mailbox, and how
Dovecot holds them (the test config hibernates idle IDLE sessions, see
testservers/dovecot/dovecot.conf). Limits that apply: this process's open files (one per
IDLE connection plus the kept sessions; the hard limit here is 20,000 and cannot be
raised without CAP_SYS_RESOURCE) and the kernel's pid_max for Dovecot's imap processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import psycopg  # noqa: E402
from sqlalchemy import text, update  # noqa: E402

from serversync import wiring  # noqa: E402
from serversync.config import Settings  # noqa: E402
from serversync.core.model import Channel  # noqa: E402
from serversync.core.schedule import percentile  # noqa: E402
from serversync.manifest import Manifest, validate  # noqa: E402
from serversync.runtime.push import Push  # noqa: E402
from serversync.runtime.scheduler import Scheduler  # noqa: E402
from serversync.services import Services  # noqa: E402
from serversync.services.runs import ChannelRunner, RunLog  # noqa: E402
from serversync.store.crypto import encode_key, new_key  # noqa: E402
from serversync.store.runs import ChannelScheduleRow  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
IDLE = int(os.environ.get("BENCH_SCALE_IDLE", "0") or 0)
if IDLE and QUICK:
    IDLE = min(IDLE, 300)
N = IDLE or (100 if QUICK else 1000)
MESSAGES = 20 if QUICK else 50
ROOT = Path(os.environ.get("SERVERSYNC_TESTSERVERS_ROOT", "/srv/serversync-test"))
USERS_FILE = ROOT / "dovecot" / "users"
VMAILBOX = ROOT / "postfix" / "etc" / "vmailbox"
CA_FILE = ROOT / "dovecot" / "ssl" / "cert.pem"
PG_ADMIN = os.environ.get("SERVERSYNC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LOGS = Path(tempfile.gettempdir())  # the workers' logs: bench-scale-worker<i>.log
ADDRESSES = [f"bench{i:04d}@example.test" for i in range(1, N + 1)]


def ensure_users() -> None:
    """Add the bench users to the running Dovecot (passwd-file) and Postfix (vmailbox)."""
    present = set()
    for line in USERS_FILE.read_text().splitlines():
        present.add(line.split(":", 1)[0])
    missing = [a for a in ADDRESSES if a not in present]
    if missing:
        with USERS_FILE.open("a") as users:
            for address in missing:
                users.write(f"{address}:{{PLAIN}}{address.split('@')[0]}-pw::::::\n")
        subprocess.run(["doveadm", "-c", str(ROOT / "dovecot" / "dovecot.conf"), "reload"],
                       check=True, capture_output=True)
        time.sleep(1)
    accepted = {line.split()[0] for line in VMAILBOX.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    missing = [a for a in ADDRESSES if a not in accepted]
    if missing:  # texthash: Postfix rereads it on reload
        with VMAILBOX.open("a") as vmailbox:
            vmailbox.writelines(f"{a} OK\n" for a in missing)
        subprocess.run(["postfix", "-c", str(VMAILBOX.parent), "reload"], check=True,
                       capture_output=True)
        time.sleep(1)


def manifest() -> Manifest:
    return validate(Manifest, {
        "settings": {"process_only_approved_mailboxes": True},
        "directory": [{"kind": "user", "key": a.split("@")[0], "name": a, "emails": [a],
                       "tracking_rule": "all"} for a in ADDRESSES],
        "profiles": [{"name": "bench", "kind": "imap",
                      "incoming": {"host": "127.0.0.1", "port": 10143, "tls": "starttls"},
                      "credential_source": "mailbox", "ca_file": str(CA_FILE),
                      "max_concurrent_connections": 100, "min_polling_interval_s": 600}],
        "mailboxes": [{"address": a, "owner": a.split("@")[0], "profile": "bench",
                       "incoming": "server-side", "approval": "approved",
                       "allow_credentials": True, "secret": f"{a.split('@')[0]}-pw",
                       "tracking_rule": "all"} for a in ADDRESSES],
    })


async def configure(services: Services) -> None:
    await services.apply(manifest())
    async with services.db.transaction() as repo:  # Test & Enable for 1,000 is its own bench
        await repo.session.execute(text("UPDATE mailboxes SET incoming_enabled = :t"), {"t": True})


def rss_kib(pid: int | None = None) -> int:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def make_all_due(services: Services) -> None:
    async with services.db.transaction() as repo:
        await repo.session.execute(update(ChannelScheduleRow).values(
            next_run_at=services.clock(), backoff_until=None))


def send(to: str, subject: str) -> str:
    # A sender per message: one sender's 60 messages within minutes (and those of earlier
    # runs, still in the INBOXes) would rightly trip the loop guard (20 in 120 minutes).
    message_id = f"<{uuid.uuid4().hex}@bench.example>"
    sender = f"push-{uuid.uuid4().hex[:12]}@external.test"
    raw = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Message-ID: {message_id}\r\n\r\nbench\r\n").encode()
    with smtplib.SMTP("127.0.0.1", 10026, timeout=10) as smtp:
        smtp.sendmail(sender, [to], raw)
    return message_id


async def delivery_latency(services: Services, count: int) -> tuple[list[float], list[float]]:
    """Send ``count`` messages; return (delivery → tracked, delivery → in the INBOX) in s."""
    import imaplib
    import ssl
    rng = random.Random(6)
    sent: dict[str, float] = {}
    tracked: dict[str, float] = {}

    expected = [count]  # grows by the baseline messages, which get tracked too

    async def watch_db() -> None:
        while len(tracked) < expected[0]:
            async with services.db.transaction() as repo:
                rows = await repo.session.execute(text(
                    "SELECT message_id FROM emails WHERE sender LIKE 'push-%@external.test'"))
                now = time.monotonic()
                for (mid,) in rows:
                    if mid in sent and mid not in tracked:
                        tracked[mid] = now
            await asyncio.sleep(0.02)

    def raw_delivery(to: str) -> float:
        """Baseline: SMTP accept → visible in the INBOX over IMAP (polled every 20 ms)."""
        conn = imaplib.IMAP4("127.0.0.1", 10143, timeout=10)
        conn.starttls(ssl.create_default_context(cafile=str(CA_FILE)))
        conn.login(to, to.split("@")[0] + "-pw")
        conn.select("INBOX", readonly=True)
        start = time.monotonic()
        mid = send(to, "baseline")
        while True:
            _, data = conn.search(None, "HEADER", "Message-ID", mid)
            if data[0]:
                break
            time.sleep(0.02)
        conn.logout()
        sent[mid] = start  # tracked as well, later: not counted in the push figures
        return time.monotonic() - start

    watcher = asyncio.create_task(watch_db())
    targets = [rng.choice(ADDRESSES) for _ in range(count)]
    ours: list[str] = []
    for to in targets:
        start = time.monotonic()
        mid = await asyncio.to_thread(send, to, "push")
        sent[mid] = start
        ours.append(mid)
        await asyncio.sleep(0.2)
    baseline = [await asyncio.to_thread(raw_delivery, rng.choice(ADDRESSES)) for _ in range(10)]
    expected[0] = len(sent)
    try:
        await asyncio.wait_for(watcher, 60)
    except TimeoutError:
        pass
    return [tracked[m] - sent[m] for m in ours if m in tracked], baseline


async def serve_step() -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    settings = Settings(database_url=f"sqlite:///{workdir / 'scale.db'}",
                        key_file=workdir / "key")
    services = await wiring.services(settings, keep_sessions=True)  # as `serve` does
    job: Any = services.jobs[Channel.INCOMING]
    result: dict[str, Any] = {}
    try:
        await configure(services)
        runlog = RunLog(services.db)
        scheduler = Scheduler(runlog, ChannelRunner(services), max_concurrency=100)
        start = time.perf_counter()
        runs = await scheduler.run_until_idle(limit_s=600)
        result["initial_s"] = time.perf_counter() - start
        result["initial_failed"] = sum(1 for r in runs if r.error)
        # Baseline: the no-change sync of 20 mailboxes, one after another, scaled to N.
        runner = ChannelRunner(services)
        start = time.perf_counter()
        for address in ADDRESSES[:20]:
            await runner.run(address, Channel.INCOMING)
        result["sequential_cycle_s"] = (time.perf_counter() - start) / 20 * N
        await make_all_due(services)
        logins_before = job.sessions.logins
        start = time.perf_counter()
        runs = await scheduler.run_until_idle(limit_s=600)
        result["cycle_s"] = time.perf_counter() - start
        result["cycle_runs"] = len(runs)
        result["cycle_failed"] = sum(1 for r in runs if r.error)
        result["cycle_logins"] = job.sessions.logins - logins_before
        # The same cycle without kept sessions (each run connects, logs in and out).
        await job.sessions.close()
        await make_all_due(services)
        start = time.perf_counter()
        runs = await scheduler.run_until_idle(limit_s=600)
        result["cold_cycle_s"] = time.perf_counter() - start
        result["cold_cycle_failed"] = sum(1 for r in runs if r.error)
        # Push: every mailbox IDLE; memory per idle mailbox.
        before = rss_kib()
        push = Push(services, wiring.PUSHERS, runlog.request_sync, rescan_s=3600,
                    connect_concurrency=50)
        live = Scheduler(runlog, ChannelRunner(services, push=push.covers), max_concurrency=100)
        tasks = [asyncio.create_task(push.run()), asyncio.create_task(live.run())]
        start = time.perf_counter()
        while len(push.ready) < N and time.perf_counter() - start < 300:
            await asyncio.sleep(0.2)
        result["push_ready"] = len(push.ready)
        result["push_connect_s"] = time.perf_counter() - start
        await asyncio.sleep(2)
        result["kib_per_idle"] = (rss_kib() - before) / max(1, len(push.ready))
        latencies, baseline = await delivery_latency(services, MESSAGES)
        result["latencies"], result["baseline"] = latencies, baseline
        await push.stop()
        await live.stop(5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await job.aclose()
        await services.db.close()
    return result


def dovecot_processes() -> dict[str, int]:
    """Dovecot's imap and imap-hibernate processes now, and their PSS (KiB): proportional
    set size, so that the pages the ~1,000s of imap processes share count once."""
    found = {"imap": 0, "imap_kib": 0, "hibernate": 0, "hibernate_kib": 0}
    for proc in Path("/proc").iterdir():
        try:
            name = (proc / "comm").read_text().strip()
            kind = {"imap": "imap", "imap-hibernate": "hibernate"}.get(name)
            if kind is None or "dovecot" not in (proc / "cmdline").read_text():
                continue
            rollup = (proc / "smaps_rollup").read_text()
        except OSError:  # gone meanwhile, or not a process directory
            continue
        found[kind] += 1
        found[f"{kind}_kib"] += next((int(line.split()[1]) for line in rollup.splitlines()
                                      if line.startswith("Pss:")), 0)
    return found


async def idle_step() -> dict[str, Any]:
    """N mailboxes, `serve` on SQLite: initial sync, no-change cycle, IDLE on all of them."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-idle-"))
    settings = Settings(database_url=f"sqlite:///{workdir / 'scale.db'}",
                        key_file=workdir / "key")
    services = await wiring.services(settings, keep_sessions=True)  # as `serve` does
    job: Any = services.jobs[Channel.INCOMING]
    result: dict[str, Any] = {"nofile": hard}
    try:
        start = time.perf_counter()
        await configure(services)
        result["configure_s"] = time.perf_counter() - start
        runlog = RunLog(services.db)
        scheduler = Scheduler(runlog, ChannelRunner(services), max_concurrency=100)
        start = time.perf_counter()
        runs = await scheduler.run_until_idle(limit_s=3600)
        result["initial_s"] = time.perf_counter() - start
        result["initial_failed"] = sum(1 for r in runs if r.error)
        for label in ("cycle", "cycle2"):
            await make_all_due(services)
            logins, reuses = job.sessions.logins, job.sessions.reuses
            start = time.perf_counter()
            runs = await scheduler.run_until_idle(limit_s=3600)
            result[f"{label}_s"] = time.perf_counter() - start
            result[f"{label}_runs"] = len(runs)
            result[f"{label}_failed"] = sum(1 for r in runs if r.error)
            result[f"{label}_logins"] = job.sessions.logins - logins
            result[f"{label}_reuses"] = job.sessions.reuses - reuses
        before = rss_kib()
        push = Push(services, wiring.PUSHERS, runlog.request_sync, rescan_s=3600,
                    connect_concurrency=50)
        live = Scheduler(runlog, ChannelRunner(services, push=push.covers), max_concurrency=100)
        tasks = [asyncio.create_task(push.run()), asyncio.create_task(live.run())]
        start = time.perf_counter()
        while len(push.ready) < N and time.perf_counter() - start < 900:
            await asyncio.sleep(0.5)
        result["push_ready"] = len(push.ready)
        result["push_connect_s"] = time.perf_counter() - start
        await asyncio.sleep(30)  # past imap_hibernate_timeout (10 s), for most of them
        result["kib_per_idle"] = (rss_kib() - before) / max(1, len(push.ready))
        result["rss_kib"] = rss_kib()
        result["open_files"] = len(os.listdir("/proc/self/fd"))
        result["dovecot"] = dovecot_processes()
        await push.stop()
        await live.stop(5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await job.aclose()
        await services.db.close()
    return result


def idle_main() -> None:
    ensure_users()
    r = asyncio.run(idle_step())
    d = r["dovecot"]
    print(f"\nbench-scale idle: {N} mailboxes on Dovecot (STARTTLS, own credentials), serve "
          f"on SQLite, 100 runs at once, at most 1,000 kept IMAP sessions")
    print(f"configure {r['configure_s']:.1f} s; initial sync {r['initial_s']:.1f} s "
          f"({r['initial_failed']} failed)")
    for label in ("cycle", "cycle2"):
        print(f"no-change {label}: {r[f'{label}_s']:.2f} s for {r[f'{label}_runs']} runs "
              f"({r[f'{label}_s'] / max(1, r[f'{label}_runs']) * 1000:.2f} ms a run; "
              f"{r[f'{label}_failed']} failed, {r[f'{label}_logins']} logins, "
              f"{r[f'{label}_reuses']} kept sessions reused)")
    print(f"IDLE connected {r['push_ready']}/{N} in {r['push_connect_s']:.1f} s; process RSS "
          f"{r['rss_kib'] / 1024:.0f} MiB, {r['open_files']} open files (limit {r['nofile']})")
    print(f"Dovecot 30 s later: {d['imap']} imap processes ({d['imap_kib'] / 1024:.0f} MiB PSS; "
          f"the kept sessions and IDLE ones not hibernated yet), {d['hibernate']} "
          f"imap-hibernate ({d['hibernate_kib'] / 1024:.0f} MiB PSS)")
    cycle = min(r["cycle_s"], r["cycle2_s"])
    print(f"RESULT scale_idle_mailboxes {r['push_ready']}")
    print(f"RESULT scale_idle_cycle {cycle:.2f} s")
    print(f"RESULT scale_idle_memory_per_mailbox {r['kib_per_idle']:.0f} KiB")
    print(f"RESULT scale_idle_dovecot_kib_per_mailbox "
          f"{(d['imap_kib'] + d['hibernate_kib']) / max(1, r['push_ready']):.0f} KiB")


async def workers_step() -> dict[str, Any]:
    name = f"serversync_scale_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    key = encode_key(new_key())
    settings = Settings(database_url=url, secret_keys=key)
    services = await wiring.services(settings)
    result: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await configure(services)
        env = {**os.environ, "SERVERSYNC_DATABASE_URL": url, "SERVERSYNC_SECRET_KEY": key}
        procs = [subprocess.Popen([sys.executable, "-m", "serversync.cli", "worker",
                                   "--concurrency", "50"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL,
                                  stderr=(LOGS / f"bench-scale-worker{i}.log").open("wb"))
                 for i in range(2)]
        runlog = RunLog(services.db)

        async def runs_after(since: float) -> int:
            async with services.db.transaction() as repo:
                return int((await repo.session.execute(text(
                    "SELECT count(DISTINCT mailbox_id) FROM sync_runs WHERE outcome IS NOT "
                    "NULL AND finished_at >= :t"),
                    {"t": dt.datetime.fromtimestamp(since, dt.UTC)}
                )).scalar_one())
        wall = time.time()
        start = time.perf_counter()
        while await runs_after(wall - 1) < N and time.perf_counter() - start < 600:
            await asyncio.sleep(0.5)
        result["initial_s"] = time.perf_counter() - start
        await asyncio.sleep(20)  # let both workers claim and connect their IDLE share
        wall = time.time()
        await make_all_due(services)
        start = time.perf_counter()
        while await runs_after(wall) < N and time.perf_counter() - start < 300:
            await asyncio.sleep(0.1)
        result["cycle_s"] = time.perf_counter() - start
        result["rss_kib"] = [rss_kib(p.pid) for p in procs]
        latencies, baseline = await delivery_latency(services, MESSAGES)
        result["latencies"], result["baseline"] = latencies, baseline
        stats = await runlog.stats(services.clock().replace(hour=0, minute=0))
        result["failed_runs"] = stats["totals"]["transient"] + stats["totals"]["permanent"]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        await services.db.close()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
    return result


def p(values: list[float], q: float) -> float:
    return percentile(values, q) or float("nan")


def main() -> None:
    if IDLE:
        idle_main()
        return
    ensure_users()
    serve = asyncio.run(serve_step())
    workers = asyncio.run(workers_step())
    base_p50 = p(serve["baseline"], 50)
    rows = [
        ("no-change cycle, serve/SQLite (s)", serve["cycle_s"], serve["sequential_cycle_s"]),
        ("same, no kept sessions (s)", serve["cold_cycle_s"], serve["sequential_cycle_s"]),
        ("no-change cycle, 2 workers/PG (s)", workers["cycle_s"], serve["sequential_cycle_s"]),
        ("delivery→tracked p50, serve (s)", p(serve["latencies"], 50), base_p50),
        ("delivery→tracked p99, serve (s)", p(serve["latencies"], 99), base_p50),
        ("delivery→tracked p50, workers (s)", p(workers["latencies"], 50), base_p50),
        ("delivery→tracked p99, workers (s)", p(workers["latencies"], 99), base_p50),
        ("memory per idle mailbox, serve (KiB)", serve["kib_per_idle"], 1024.0),
        ("RSS per mailbox, 2 workers (KiB)", sum(workers["rss_kib"]) / N, 1024.0),
    ]
    print(f"\nbench-scale: {N} mailboxes on Dovecot (STARTTLS, own credentials); "
          f"{MESSAGES} messages for latency")
    print(f"initial sync: serve {serve['initial_s']:.1f} s ({serve['initial_failed']} failed), "
          f"workers {workers['initial_s']:.1f} s; IDLE connected {serve['push_ready']}/{N} in "
          f"{serve['push_connect_s']:.1f} s; cycle runs {serve['cycle_runs']} "
          f"({serve['cycle_failed']} failed, {serve['cycle_logins']} new logins; cold cycle "
          f"{serve['cold_cycle_failed']} failed); worker failed runs {workers['failed_runs']}")
    print("baselines: cycle = 20 sequential no-change syncs scaled to N; latency = Postfix → "
          "Dovecot delivery alone (p50); memory = the 1 MiB target")
    print(f"{'measure':<40} {'value':>10} {'baseline':>10} {'ratio':>8}")
    for label, value, baseline in rows:
        print(f"{label:<40} {value:>10.3f} {baseline:>10.3f} {value / baseline:>8.2f}")
    print(f"tracked: serve {len(serve['latencies'])}/{MESSAGES}, "
          f"workers {len(workers['latencies'])}/{MESSAGES}")
    print(f"RESULT scale_cycle_serve {serve['cycle_s']:.2f} s")
    print(f"RESULT scale_cycle_serve_cold {serve['cold_cycle_s']:.2f} s")
    print(f"RESULT scale_cycle_workers {workers['cycle_s']:.2f} s")
    print(f"RESULT scale_push_p50_serve {p(serve['latencies'], 50):.3f} s")
    print(f"RESULT scale_push_p99_serve {p(serve['latencies'], 99):.3f} s")
    print(f"RESULT scale_push_p50_workers {p(workers['latencies'], 50):.3f} s")
    print(f"RESULT scale_push_p99_workers {p(workers['latencies'], 99):.3f} s")
    print(f"RESULT scale_memory_per_idle_mailbox {serve['kib_per_idle']:.0f} KiB")
    print(f"RESULT scale_worker_rss_per_mailbox {sum(workers['rss_kib']) / N:.0f} KiB")


if __name__ == "__main__":
    main()
