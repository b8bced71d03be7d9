"""make bench-act: two-way ACT sync against Radicale, side by side with vdirsyncer.

Data (in bench@example.test's DAV collections; BENCH_QUICK=1 uses a tenth):
  calendar  2,000 VEVENTs, 10% recurring (weekly COUNT, daily UNTIL, monthly BYMONTHDAY,
            with EXDATEs), 0-4 attendees, non-ASCII text
  tasks     500 VTODOs
  contacts  2,000 vCard 3.0 (FN, N, EMAIL, TEL, ORG, ADR, NOTE)

Radicale's PUT costs O(collection size) per item (shared/reference/peer-bench.md §9 #12),
so the items are written straight into Radicale's collection folders after the collections
were created over HTTP; a warm-up REPORT lets Radicale build its item cache before timing.

Steps, each timed for serversync (ActService.sync into a fresh SQLite database, per-mailbox
credentials) and for vdirsyncer (the same three collections to a local vdir):
  initial     first sync (vdirsyncer: discover + sync)
  no-change   a second sync with nothing changed (median of 3)
  1%-changed  1% of each collection rewritten with a new marker, then sync (median of 3);
              both tools must then hold the marker
vdirsyncer comes from PyPI into a venv the bench creates (~/.cache/serversync-bench).
Prints a table with ratios (vdirsyncer time / serversync time) and RESULT lines.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests import testservers as ts  # noqa: E402

from serversync.connectors import dav  # noqa: E402
from serversync.core.act import ItemKind  # noqa: E402
from serversync.core.model import (  # noqa: E402
    ApprovalStatus,
    ChannelState,
    CredentialSource,
    Endpoint,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
)
from serversync.core.secret import Secret  # noqa: E402
from serversync.services.act import ActService  # noqa: E402
from serversync.store.crypto import Keyring, new_key  # noqa: E402
from serversync.store.db import Database  # noqa: E402

USER = "bench@example.test"
PASSWORD = "bench-pw"
QUICK = os.environ.get("BENCH_QUICK") == "1"
SCALE = 10 if QUICK else 1
EVENTS, TASKS, CONTACTS = 2000 // SCALE, 500 // SCALE, 2000 // SCALE
RUNS = 3
COLLECTIONS = ts.ROOT / "radicale" / "collections" / "collection-root" / USER
VENV = Path.home() / ".cache" / "serversync-bench" / "vdirsyncer-venv"
WORDS = ["Planung", "Kundentermin", "réunion", "Budget", "Review", "Übergabe", "kickoff",
         "Angebot", "Schulung", "Jour fixe", "Vertrag", "Lieferung"]
CITIES = ["Berlin", "Köln", "München", "Lyon", "Zürich", "Wien"]


def fold(line: str) -> str:
    """RFC 5545 / 6350 line folding at 75 octets."""
    data = line.encode()
    if len(data) <= 75:
        return line
    parts, start = [], 0
    while start < len(data):
        end = min(len(data), start + (75 if not parts else 74))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        parts.append(data[start:end].decode())
        start = end
    return "\r\n ".join(parts)


def ics(lines: list[str]) -> bytes:
    body = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//serversync bench//EN", *lines,
            "END:VCALENDAR"]
    return ("\r\n".join(fold(x) for x in body) + "\r\n").encode()


def event(i: int, rng: random.Random, marker: str = "") -> bytes:
    start = f"2027{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}T{rng.randint(7, 17):02d}0000"
    end = start[:9] + f"{int(start[9:11]) + 1:02d}0000"
    lines = ["BEGIN:VEVENT", f"UID:bench-event-{i}@example.test", "DTSTAMP:20260101T000000Z",
             f"DTSTART;TZID=Europe/Berlin:{start}", f"DTEND;TZID=Europe/Berlin:{end}",
             f"SUMMARY:{rng.choice(WORDS)} {i}{marker}",
             f"LOCATION:{rng.choice(CITIES)}, Raum {rng.randint(1, 40)}",
             "DESCRIPTION:" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))),
             "ORGANIZER;CN=Bench:mailto:bench@example.test"]
    for n in range(rng.randint(0, 4)):
        lines.append(f"ATTENDEE;CN=Person {n};ROLE=REQ-PARTICIPANT;PARTSTAT=NEEDS-ACTION:"
                     f"mailto:person{i % 97 + n}@example.test")
    if i % 10 == 0:
        lines.append(rng.choice(["RRULE:FREQ=WEEKLY;COUNT=10", "RRULE:FREQ=DAILY;UNTIL=20280101T000000Z",
                                 "RRULE:FREQ=MONTHLY;BYMONTHDAY=15"]))
        lines.append(f"EXDATE;TZID=Europe/Berlin:{start}")
    lines += ["BEGIN:VALARM", "ACTION:DISPLAY", "DESCRIPTION:Reminder", "TRIGGER:-PT15M",
              "END:VALARM", "END:VEVENT"]
    return ics(lines)


def todo(i: int, rng: random.Random, marker: str = "") -> bytes:
    return ics(["BEGIN:VTODO", f"UID:bench-task-{i}@example.test", "DTSTAMP:20260101T000000Z",
                f"SUMMARY:{rng.choice(WORDS)} task {i}{marker}",
                f"DUE:2027{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}T170000Z",
                f"PRIORITY:{rng.randint(1, 9)}", "STATUS:NEEDS-ACTION", "END:VTODO"])


def vcard(i: int, rng: random.Random, marker: str = "") -> bytes:
    given, family = rng.choice(["Anna", "Jörg", "Chloé", "Ben", "Sophie"]), f"Muster{i}"
    lines = ["BEGIN:VCARD", "VERSION:3.0", f"UID:bench-contact-{i}@example.test",
             f"FN:{given} {family}{marker}", f"N:{family};{given};;;",
             f"EMAIL;TYPE=INTERNET:{given.lower()}.{i}@example.test",
             f"TEL;TYPE=WORK:+49 30 {rng.randint(1000000, 9999999)}",
             f"ORG:{rng.choice(WORDS)} GmbH",
             f"ADR;TYPE=WORK:;;Hauptstraße {i};{rng.choice(CITIES)};;{10000 + i};DE",
             "NOTE:" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))),
             "END:VCARD"]
    return ("\r\n".join(fold(x) for x in lines) + "\r\n").encode()


MAKERS: dict[str, tuple[Callable[[int, random.Random, str], bytes], int, str]] = {
    "calendar": (event, EVENTS, ".ics"), "tasks": (todo, TASKS, ".ics"),
    "contacts": (vcard, CONTACTS, ".vcf")}


def seed() -> None:
    # a big principal takes Radicale longer than testservers' 10 s timeout to delete
    with httpx.Client(auth=(ts.SVC, ts.USERS[ts.SVC]), timeout=600) as http:
        status = http.request("DELETE", f"{ts.DAV_URL}/{USER}/").status_code
        assert status in (200, 204, 404), status
    for path, body, method in (
            (f"/{USER}/", None, "MKCOL"),
            (f"/{USER}/calendar/", dav._mkcalendar_body("VEVENT", "Calendar"), "MKCALENDAR"),
            (f"/{USER}/tasks/", dav._mkcalendar_body("VTODO", "Tasks"), "MKCALENDAR"),
            (f"/{USER}/contacts/", dav._mkcol_addressbook_body("Contacts"), "MKCOL")):
        status, data = ts.dav_request(method, path, body=body,
                                      headers={"Content-Type": "application/xml"})
        assert status == 201, (path, status, data[:200])
    rng = random.Random(42)
    for name, (make, count, ext) in MAKERS.items():
        folder = COLLECTIONS / name
        for i in range(count):
            (folder / f"item-{i}{ext}").write_bytes(make(i, rng, ""))
    warm()


def warm() -> None:
    """Let Radicale index the files (it parses each new item once into its cache: ~10 ms an
    event) before anything is timed."""
    body = ('<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:prop><D:getetag/>'
            "</D:prop></D:propfind>")
    with httpx.Client(auth=(ts.SVC, ts.USERS[ts.SVC]), timeout=600) as http:
        for name in MAKERS:
            response = http.request("PROPFIND", f"{ts.DAV_URL}/{USER}/{name}/", content=body,
                                    headers={"Depth": "1", "Content-Type": "application/xml"})
            assert response.status_code == 207, response.status_code


def change(round_no: int) -> tuple[str, int]:
    """Rewrite 1% of each collection with a new marker; returns (marker, items changed)."""
    marker, changed = f" rev{round_no}x{time.time_ns() % 10**6}", 0
    for name, (make, count, ext) in MAKERS.items():
        rng = random.Random(round_no)
        for i in rng.sample(range(count), max(1, count // 100)):
            (COLLECTIONS / name / f"item-{i}{ext}").write_bytes(make(i, random.Random(i), marker))
            changed += 1
    return marker, changed


# ---------------------------------------------------------------- serversync


class Ours:
    def __init__(self, workdir: Path) -> None:
        self.db = Database(f"sqlite:///{workdir}/serversync.db", Keyring(new_key()))
        self.service = ActService(self.db, {ServerKind.IMAP: dav.store})

    async def setup(self) -> None:
        await self.db.migrate()
        profile = Profile(name="bench-dav", kind=ServerKind.IMAP,
                          incoming=Endpoint(ts.HOST, ts.IMAP_PORT), dav_url=ts.DAV_URL,
                          allow_plaintext=True, credential_source=CredentialSource.MAILBOX,
                          conflict_policy="server-wins")
        mailbox = Mailbox(address=USER, owner_kind=PartyKind.USER, owner=USER,
                          profile=profile.name, act=ChannelState(SyncMethod.SERVER_SIDE, True),
                          approval=ApprovalStatus.APPROVED, allow_credentials=True,
                          username=USER, secret=Secret(PASSWORD))
        async with self.db.transaction() as repo:
            await repo.save_profile(profile)
            await repo.save_mailbox(mailbox)

    async def sync(self) -> tuple[float, int]:
        start = time.perf_counter()
        summary = await self.service.sync(USER)
        return time.perf_counter() - start, summary.items

    async def count_marker(self, marker: str) -> int:
        found = 0
        for kind in ItemKind:
            for record in await self.service.list_records(kind):
                text = getattr(record, "subject", "") or getattr(record, "full_name", "")
                found += marker in text
        return found


# ---------------------------------------------------------------- vdirsyncer


def vdirsyncer_bin() -> Path:
    exe = VENV / "bin" / "vdirsyncer"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "vdirsyncer"], check=True)
    return exe


def vdir_config(workdir: Path) -> Path:
    parts = [f'[general]\nstatus_path = "{workdir}/status/"\n']
    for name, kind, ext in (("calendar", "caldav", ".ics"), ("tasks", "caldav", ".ics"),
                            ("contacts", "carddav", ".vcf")):
        parts.append(f'[pair {name}]\na = "{name}_local"\nb = "{name}_remote"\n'
                     f'collections = ["{name}"]\nconflict_resolution = "b wins"\n'
                     f'[storage {name}_local]\ntype = "filesystem"\npath = "{workdir}/{name}/"\n'
                     f'fileext = "{ext}"\n[storage {name}_remote]\ntype = "{kind}"\n'
                     f'url = "{ts.DAV_URL}/"\nusername = "{USER}"\npassword = "{PASSWORD}"\n')
    path = workdir / "vdirsyncer.conf"
    path.write_text("\n".join(parts))
    return path


def vdir(exe: Path, config: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([str(exe), "-c", str(config), *args], input="y\n" * 10, text=True,
                          capture_output=True, timeout=900, check=False)
    if proc.returncode:
        raise RuntimeError(f"vdirsyncer {args}: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def vdir_marker(workdir: Path, marker: str) -> int:
    found = 0
    for name in MAKERS:
        for path in (workdir / name / name).glob("*"):
            text = path.read_text(errors="replace").replace("\r\n ", "").replace("\n ", "")
            found += marker in text
    return found


# ---------------------------------------------------------------- main


async def main() -> None:
    total = EVENTS + TASKS + CONTACTS
    print(f"seeding {EVENTS} events, {TASKS} tasks, {CONTACTS} contacts into Radicale ...",
          flush=True)
    t0 = time.perf_counter()
    seed()
    print(f"seeded in {time.perf_counter() - t0:.1f} s (files written directly)", flush=True)
    exe = vdirsyncer_bin()
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="bench-act-"))
    try:
        ours = Ours(work)
        await ours.setup()
        vwork = work / "vdir"
        vwork.mkdir()
        config = vdir_config(vwork)
        results: dict[str, tuple[float, float]] = {}

        ours_initial, items = await ours.sync()
        assert items == total, f"serversync imported {items} of {total}"
        v_initial = vdir(exe, config, "discover") + vdir(exe, config, "sync")
        results["initial"] = (ours_initial, v_initial)

        ours_none, v_none = [], []
        for _ in range(RUNS):
            seconds, items = await ours.sync()
            assert items == 0, f"no-change sync did {items} changes"
            ours_none.append(seconds)
            v_none.append(vdir(exe, config, "sync"))
        results["no-change"] = (statistics.median(ours_none), statistics.median(v_none))

        ours_changed, v_changed = [], []
        for round_no in range(1, RUNS + 1):
            marker, changed = change(round_no)
            warm()  # Radicale re-indexes the rewritten files here, not inside a timed step
            seconds, items = await ours.sync()
            ours_changed.append(seconds)
            v_changed.append(vdir(exe, config, "sync"))
            assert await ours.count_marker(marker) == changed, "serversync missed a change"
            assert vdir_marker(vwork, marker) == changed, "vdirsyncer missed a change"
        results["1%-changed"] = (statistics.median(ours_changed), statistics.median(v_changed))
        await ours.db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nACT sync, {total} items (Radicale 3, loopback), serversync vs {version}")
    print(f"{'step':<12} {'serversync s':>13} {'vdirsyncer s':>13} {'ratio':>7}")
    for step, (mine, theirs) in results.items():
        print(f"{step:<12} {mine:>13.3f} {theirs:>13.3f} {theirs / mine:>6.1f}x")
    print()
    for step, (mine, theirs) in results.items():
        slug = step.replace("%", "pct")
        print(f"RESULT act_{slug}_seconds {mine:.3f} s")
        print(f"RESULT act_{slug}_vdirsyncer_seconds {theirs:.3f} s")
        print(f"RESULT act_{slug}_ratio {theirs / mine:.2f} x")


if __name__ == "__main__":
    asyncio.run(main())
