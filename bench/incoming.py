"""make bench-incoming: initial IMAP sync of 10,000 messages, against the raw limit and peers.

Steps (each one its own process, so wall time and peak RSS are the step's own):

  raw        imaplib ``UID FETCH a:b (UID BODY.PEEK[])`` in batches of 500, parses nothing
  sqlite     serversync initial sync (IncomingJob) into a fresh SQLite database
  postgres   the same into a fresh PostgreSQL database
  poll       no-change poll: the incoming job on the synced SQLite database, 20 times, on
             the IMAP session kept between runs (warm) and with a new login per run (cold)
  mbsync / offlineimap / getmail   the peers (Debian packages, installed here with apt-get
             when missing), each copying the INBOX to a fresh Maildir, run as uid 65534
             (getmail refuses to deliver as root; shared/reference/peer-bench.md §9)

The corpus is generated here: 2-200 KB messages, 10% with an attachment (deterministic
seed), written straight into bench@example.test's INBOX Maildir (tests/testservers.py
fill_maildir). BENCH_QUICK=1 uses 1,000 messages and skips offlineimap and getmail.
Prints a table with ratios to the raw limit and ``RESULT`` lines.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests import testservers as ts  # noqa: E402

USER = "bench@example.test"
PASSWORD = "bench-pw"
QUICK = os.environ.get("BENCH_QUICK") == "1"
COUNT = int(os.environ.get("BENCH_MESSAGES", "1000" if QUICK else "10000"))
PG_ADMIN = os.environ.get("SERVERSYNC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NOBODY = 65534
WORDS = ("order invoice meeting quote shipment contract renewal support ticket update "  # noqa: SIM905
         "please review attached thanks regards schedule payment delivery").split()


# ---------------------------------------------------------------- corpus

def corpus(count: int, seed: int = 42) -> list[bytes]:
    """2-200 KB messages; 10% carry a base64 attachment (most of their size)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        attach = i % 10 == 0
        text_kb = rng.uniform(2, 20) if not attach else rng.uniform(1, 4)
        words = int(text_kb * 1024 / 7)
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        body = "\r\n".join(body[j:j + 76] for j in range(0, len(body), 76))
        sender = f"customer{rng.randrange(500)}@customer{rng.randrange(50)}.test"
        head = (f"From: Customer <{sender}>\r\nTo: {USER}\r\nSubject: {rng.choice(WORDS)} "
                f"#{i}\r\nDate: {email.utils.formatdate(1.7e9 + i * 60)}\r\n"
                f"Message-ID: <bench-{i}-{seed}@bench.test>\r\nMIME-Version: 1.0\r\n")
        if not attach:
            out.append((head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
                        + "\r\n").encode())
            continue
        blob = rng.randbytes(int(rng.uniform(16, 150) * 1024))
        encoded = base64.encodebytes(blob).decode().replace("\n", "\r\n")
        out.append((head + 'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
                    "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n--B\r\n"
                    f"Content-Type: application/pdf; name=doc{i}.pdf\r\n"
                    "Content-Transfer-Encoding: base64\r\n\r\n" + encoded + "--B--\r\n").encode())
    return out


def seed(messages: list[bytes]) -> None:
    ts.reset_mailbox(USER)
    ts.fill_maildir(USER, "INBOX", messages)
    conn = ts.imap_login(USER, PASSWORD)
    try:
        typ, data = conn.select("INBOX", readonly=True)  # Dovecot indexes the new files
        assert typ == "OK" and int(data[0]) == len(messages), data
    finally:
        conn.logout()


# ---------------------------------------------------------------- steps (child processes)

def step_raw() -> dict[str, Any]:
    import imaplib
    t0 = time.perf_counter()
    conn = imaplib.IMAP4(ts.HOST, ts.IMAP_PORT)
    conn.login(USER, PASSWORD)
    conn.select("INBOX", readonly=True)
    uids = [int(x) for x in conn.uid("SEARCH", None, "ALL")[1][0].split()]
    n = size = 0
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        _, data = conn.uid("FETCH", f"{chunk[0]}:{chunk[-1]}", "(UID BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                n += 1
                size += len(item[1])
    conn.logout()
    return {"seconds": time.perf_counter() - t0, "messages": n, "bytes": size}


async def _configure(url: str, key: bytes) -> Any:
    from serversync import wiring
    from serversync.core.model import Channel
    from serversync.manifest import Manifest, validate
    from serversync.services import Services
    from serversync.store.crypto import Keyring
    from serversync.store.db import Database
    db = Database(url, Keyring(key))
    await db.migrate()
    services = Services(db, wiring.PROBERS)
    await services.apply(validate(Manifest, {
        "directory": [{"kind": "user", "key": "bench", "emails": [USER]}],
        "profiles": [{"name": "bench", "kind": "imap", "credential_source": "mailbox",
                      "incoming": {"host": ts.HOST, "port": ts.IMAP_PORT, "tls": "none"},
                      "allow_plaintext": True}],
        "mailboxes": [{"address": USER, "owner": "bench", "profile": "bench",
                       "incoming": "server-side", "approval": "approved",
                       "allow_credentials": True, "secret": PASSWORD,
                       "tracking_rule": "all"}]}))
    async with db.transaction() as repo:
        await repo.set_channel(USER, Channel.INCOMING, enabled=True)
    return db


async def _sync(url: str, key: bytes) -> dict[str, Any]:
    from serversync import wiring
    from serversync.services.incoming import IncomingJob
    db = await _configure(url, key)
    job = IncomingJob(db, wiring.INCOMING_SOURCES)
    t0 = time.perf_counter()
    summary = await job(USER)
    seconds = time.perf_counter() - t0
    await db.close()
    result = {"seconds": seconds, "messages": summary.items, "detail": summary.detail}
    if url.startswith("sqlite:///"):  # database file(s) and the blob packs beside them
        folder = Path(url.split("///", 1)[1]).parent
        result["disk_mb"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    return result


async def _poll(url: str, key: bytes, kept: bool) -> dict[str, Any]:
    """Median of 20 no-change runs of the incoming job; ``kept``: on the IMAP session kept
    between runs (`connectors.imapsessions`, as ``serve`` and ``worker`` do), else each run
    connects, logs in and out."""
    from serversync import wiring
    from serversync.connectors.imapsessions import SessionCache
    from serversync.services.incoming import IncomingJob
    db = await _configure(url, key)
    sessions: SessionCache[Any] | None = SessionCache() if kept else None
    job = IncomingJob(db, wiring.INCOMING_SOURCES, sessions=sessions)
    await job(USER)  # warm-up (the database was synced by the sqlite step)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        summary = await job(USER)
        times.append(time.perf_counter() - t0)
        assert summary.items == 0, summary
    logins = sessions.logins if sessions else 21
    await job.aclose()
    await db.close()
    return {"seconds": statistics.median(times), "min": min(times), "messages": 0,
            "logins": logins}


def child(step: str, arg: str, key: str) -> None:
    raw_key = base64.urlsafe_b64decode(key) if key else b""
    if step == "raw":
        result = step_raw()
    elif step == "sync":
        result = asyncio.run(_sync(arg, raw_key))
    elif step in ("poll", "poll-cold"):
        result = asyncio.run(_poll(arg, raw_key, kept=step == "poll"))
    else:
        raise SystemExit(f"unknown step {step}")
    # VmHWM: this process's own peak RSS (reset at exec, unlike wait4's ru_maxrss)
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    result["rss_mb"] = int(hwm.split()[1]) / 1024
    print("JSON " + json.dumps(result))


def run_child(step: str, arg: str = "", key: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--step", step, arg, key],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"step {step} failed ({proc.returncode}):\n{out}\n{err}")
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    result: dict[str, Any] = json.loads(line[5:])
    result.update(wall=wall)
    return result


# ---------------------------------------------------------------- peers

PEERS = {"mbsync": "isync", "offlineimap": "offlineimap3", "getmail": "getmail6"}


def ensure_peers(names: list[str]) -> list[str]:
    missing = [PEERS[n] for n in names if shutil.which(n) is None]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env,
                       capture_output=True, check=False, timeout=600)
    return [n for n in names if shutil.which(n) is not None]


def peer_config(name: str, root: Path) -> list[str]:
    target = root / "maildir"
    target.mkdir(exist_ok=True)  # mbsync needs the store's root to exist
    if name == "mbsync":
        (root / "mbsyncrc").write_text(
            f"IMAPAccount bench\nHost {ts.HOST}\nPort {ts.IMAP_PORT}\nUser {USER}\n"
            f"Pass {PASSWORD}\nSSLType None\nAuthMechs LOGIN\n\nIMAPStore remote\n"
            f"Account bench\n\nMaildirStore local\nPath {target}/\nInbox {target}/INBOX\n\n"
            "Channel inbox\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\n"
            "Sync Pull\nExpunge None\nSyncState *\n")
        return ["mbsync", "-q", "-c", str(root / "mbsyncrc"), "-a"]
    if name == "offlineimap":
        (root / "offlineimaprc").write_text(
            f"[general]\naccounts = bench\nmetadata = {root}/meta\nui = quiet\n"
            "[Account bench]\nlocalrepository = local\nremoterepository = remote\n"
            f"[Repository local]\ntype = Maildir\nlocalfolders = {target}\n"
            f"[Repository remote]\ntype = IMAP\nremotehost = {ts.HOST}\n"
            f"remoteport = {ts.IMAP_PORT}\nremoteuser = {USER}\nremotepass = {PASSWORD}\n"
            "ssl = no\nstarttls = no\nreadonly = True\n"
            "folderfilter = lambda f: f == 'INBOX'\n")
        return ["offlineimap", "-c", str(root / "offlineimaprc"), "-o", "-u", "quiet"]
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    (root / "getmailrc").write_text(
        f"[retriever]\ntype = SimpleIMAPRetriever\nserver = {ts.HOST}\nport = {ts.IMAP_PORT}\n"
        f"username = {USER}\npassword = {PASSWORD}\nmailboxes = (\"INBOX\",)\n"
        f"[destination]\ntype = Maildir\npath = {target}/\n"
        "[options]\nverbose = 0\nread_all = true\ndelete = false\n")
    return ["getmail", f"--getmaildir={root}/state", f"--rcfile={root}/getmailrc"]


def run_peer(name: str, expected: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    (root / "home").mkdir()
    (root / "state").mkdir()
    command = peer_config(name, root)
    for path in [root, *root.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    t0 = time.perf_counter()
    # /usr/bin/time reports the peak RSS of the peer itself (wait4's ru_maxrss would carry
    # this harness's own peak across the fork)
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(root / "rss"), "setpriv", f"--reuid={NOBODY}",
         f"--regid={NOBODY}", "--clear-groups", "env", f"HOME={root}/home", *command],
        capture_output=True, check=False)
    wall = time.perf_counter() - t0
    rss = int((root / "rss").read_text().split()[-1]) / 1024 if (root / "rss").exists() else 0
    files = sum(1 for p in (root / "maildir").rglob("*") if p.is_file()
                and p.parent.name in ("cur", "new"))
    shutil.rmtree(root, ignore_errors=True)
    note = "" if files == expected else f" (copied {files} of {expected}, exit {proc.returncode})"
    if note:
        print(f"{name}: {proc.stderr.decode(errors='replace')[-600:]}")
    return {"seconds": wall, "wall": wall, "messages": files, "rss_mb": rss, "note": note}


# ---------------------------------------------------------------- main

def main() -> None:
    from serversync.store.crypto import encode_key, new_key
    messages = corpus(COUNT)
    total = sum(len(m) for m in messages)
    print(f"corpus: {COUNT} messages, {total / 1e6:.1f} MB, "
          f"{sum(1 for i in range(COUNT) if i % 10 == 0)} with attachments", flush=True)
    t0 = time.perf_counter()
    seed(messages)
    print(f"seeded {USER} INBOX in {time.perf_counter() - t0:.1f} s", flush=True)
    key = encode_key(new_key())
    results: dict[str, dict[str, Any]] = {}
    results["raw imaplib UID FETCH (no parse)"] = run_child("raw")
    work = Path(tempfile.mkdtemp(prefix="bench-incoming-"))
    sqlite_url = f"sqlite:///{work}/serversync.db"
    results["serversync → SQLite"] = run_child("sync", sqlite_url, key)
    print(f"SQLite database + blob packs on disk: "
          f"{results['serversync → SQLite'].get('disk_mb', 0):.0f} MB", flush=True)
    results["no-change poll, kept session (median of 20)"] = run_child("poll", sqlite_url, key)
    results["no-change poll, new login (median of 20)"] = run_child("poll-cold", sqlite_url,
                                                                     key)
    import psycopg
    name = f"bench_incoming_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pg_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        results["serversync → PostgreSQL"] = run_child("sync", pg_url, key)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    shutil.rmtree(work, ignore_errors=True)
    peers = ["mbsync"] if QUICK else ["mbsync", "offlineimap", "getmail"]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        print("peers skipped: they run as uid 65534, which needs root and setpriv")
        peers = []
    for peer in ensure_peers(peers):
        results[f"{peer} → Maildir (peer)"] = run_peer(peer, COUNT)

    raw = results["raw imaplib UID FETCH (no parse)"]
    print(f"\n{'step':38} {'seconds':>9} {'msg/s':>9} {'MB/s':>8} {'peak RSS':>9} "
          f"{'vs raw':>7}")
    for label, r in results.items():
        seconds = r["seconds"]
        if label.startswith("no-change"):
            print(f"{label:38} {seconds * 1000:8.2f}ms {'':>9} {'':>8} {r['rss_mb']:7.0f}MB "
                  f"{'':>7}")
            continue
        rate = r["messages"] / seconds if seconds else 0
        mbs = total / 1e6 / seconds * (r["messages"] / COUNT) if seconds else 0
        ratio = raw["seconds"] / seconds if seconds else 0
        print(f"{label:38} {seconds:9.2f} {rate:9.0f} {mbs:8.1f} {r['rss_mb']:7.0f}MB "
              f"{ratio:6.2f}x{r.get('note', '')}")
    print("\n(serversync rows time the sync itself inside the process; raw and peers time the "
          "whole process)")
    sqlite = results["serversync → SQLite"]
    pg = results["serversync → PostgreSQL"]
    print(f"RESULT incoming_raw_limit {raw['messages'] / raw['seconds']:.0f} msg/s")
    print(f"RESULT incoming_initial_sqlite {sqlite['messages'] / sqlite['seconds']:.0f} msg/s")
    print(f"RESULT incoming_initial_postgres {pg['messages'] / pg['seconds']:.0f} msg/s")
    warm = results["no-change poll, kept session (median of 20)"]
    cold = results["no-change poll, new login (median of 20)"]
    print(f"(kept-session poll: {warm['logins']} login(s) for 21 runs)")
    print(f"RESULT incoming_nochange_poll {warm['seconds'] * 1000:.2f} ms")
    print(f"RESULT incoming_nochange_poll_cold {cold['seconds'] * 1000:.2f} ms")
    for peer in ("mbsync", "offlineimap", "getmail"):
        r = results.get(f"{peer} → Maildir (peer)")
        if r:
            print(f"RESULT incoming_peer_{peer} {r['messages'] / r['seconds']:.0f} msg/s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--step":
        child(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "",
              sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        main()
