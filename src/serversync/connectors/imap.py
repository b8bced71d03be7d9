"""IMAP mailboxes: reaching a user's folders with each access mode.

Own credentials and impersonation open the user's own namespace; delegation logs in as the
delegate and opens the user's folders through the shared namespace (RFC 4314 ACLs, e.g.
Dovecot's ``shared/<user>/``), for email only.

`ImapSource` is the incoming `MailSource`: cursors (UIDVALIDITY, last UID, HIGHESTMODSEQ
with CONDSTORE/QRESYNC, RFC 7162), batched and overlapped ``UID FETCH``, after-processing
(flag, UID MOVE, delete with UID EXPUNGE) and IDLE (RFC 2177) for push.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from imapclient.response_parser import parse_fetch_response

from serversync.connectors.imapwire import ImapClient, ImapNo, Item, Response, quote
from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import (
    Disposition,
    FetchBatch,
    FolderCursor,
    KnownFilter,
    ProbeResult,
    RemoteMessage,
)
from serversync.core.errors import PermanentError
from serversync.core.model import AccessMode, AfterProcessing, Channel, Mailbox, Profile
from serversync.core.rules import Login


def shared_folder(options: ConnectOptions, user: str, folder: str) -> list[str]:
    """Candidate names of ``folder`` of ``user`` in the shared namespace, best first.

    QUIRK(dovecot): a Maildir++ user's INBOX is the namespace root itself
    (``shared/bob@example.test``), and also answers to ``.../INBOX``.
    """
    prefix = options.shared_namespace.format(user=user)
    names = [prefix + folder]
    if folder.upper() == "INBOX":
        names.append(prefix.rstrip("/"))
    return names


async def open_folder(client: ImapClient, login: Login, options: ConnectOptions,
                      folder: str, *, readonly: bool = True) -> str:
    """Select ``folder`` of the login's target mailbox; return the name that worked."""
    if login.mode is not AccessMode.DELEGATION:
        try:
            await client.select(folder, readonly=readonly)
        except ImapNo as exc:
            raise PermanentError(
                f"folder {folder!r} of {login.target} cannot be opened ({exc.text})",
                fix="create the folder, or remove it from the mailbox's folder list",
                code="folder-not-found") from None
        return folder
    last: ImapNo | None = None
    for name in shared_folder(options, login.target, folder):
        try:
            await client.select(name, readonly=readonly)
            return name
        except ImapNo as exc:
            last = exc
    raise PermanentError(
        f"delegate {login.user} has no rights on {folder!r} of {login.target} "
        f"({last.text if last else 'not found'})",
        fix=f"grant the delegate lookup and read rights, e.g. as {login.target}: "
            f"SETACL {folder} {login.user} lrsw (or doveadm acl set), or use impersonation",
        code="delegate-rights-missing")


async def probe(profile: Profile, mailbox: Mailbox, channel: Channel, login: Login,
                options: ConnectOptions) -> ProbeResult:
    assert profile.incoming is not None
    client = ImapClient(profile.incoming, options)
    try:
        await client.connect()
        await client.login(login)
        opened = [await open_folder(client, login, options, f) for f in mailbox.folders]
    finally:
        await client.logout()
    tls = profile.incoming.tls.value
    return ProbeResult(f"IMAP ({tls}) {profile.incoming.host}:{profile.incoming.port} as "
                       f"{login.mode.value}: opened {', '.join(opened)}")


# ---------------------------------------------------------------- incoming sync

_FAST_FETCH = re.compile(
    rb'^\* \d+ FETCH \((?=.*?\bUID (\d+))(?:(?:UID \d+|RFC822\.SIZE \d+|MODSEQ \(\d+\)|'
    rb'INTERNALDATE "([^"]*)"|FLAGS \([^()]*\)) )*BODY\[\] \{\d+\}$')
_FETCH_HEAD = re.compile(rb"^\* (\d+) FETCH ", re.IGNORECASE)  # imaplib drops "* " and "FETCH"
_SELECT_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]")
_EXISTS = re.compile(rb"^\* (\d+) EXISTS")
_LIST = re.compile(rb'^\* LIST \(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)$')


@dataclass(frozen=True, slots=True)
class FolderState:
    """What SELECT/EXAMINE said about a folder (RFC 3501 §6.3.1, RFC 7162 §3.1.2.1)."""

    uidvalidity: int
    uidnext: int | None
    exists: int
    highest_modseq: int | None


def folder_state(response: Response) -> FolderState:
    codes: dict[bytes, int] = {}
    exists = 0
    for line in response.untagged:
        head = line[0] if isinstance(line[0], bytes) else line[0][0]
        for name, value in _SELECT_CODE.findall(head):
            codes[name] = int(value)
        match = _EXISTS.match(head)
        if match:
            exists = int(match.group(1))
    for name, value in _SELECT_CODE.findall(response.text.encode()):
        codes[name] = int(value)
    return FolderState(codes.get(b"UIDVALIDITY", 0), codes.get(b"UIDNEXT"), exists,
                       codes.get(b"HIGHESTMODSEQ"))


def uid_set(uids: Sequence[int]) -> bytes:
    """``1:4,7,9:10`` for sorted UIDs: a short command line for any batch."""
    parts: list[str] = []
    start = prev = None
    for uid in uids:
        if start is None:
            start = prev = uid
        elif prev is not None and uid == prev + 1:
            prev = uid
        else:
            parts.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = uid
    if start is not None:
        parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts).encode()


def _internal_date(value: bytes | str | dt.datetime | None) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    match = _DATE_TIME.match(text)
    if match:  # strptime costs ~17 µs a message (a tenth of the sync's event-loop time)
        day, month, year, hh, mm, ss, sign, zh, zm = match.groups()
        if month.title() in _MONTHS:
            try:
                offset = dt.timedelta(hours=int(zh), minutes=int(zm))
                return dt.datetime(int(year), _MONTHS[month.title()], int(day), int(hh),
                                   int(mm), int(ss), tzinfo=dt.timezone(
                                       -offset if sign == "-" else offset))
            except ValueError:
                pass
    try:
        return dt.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None


# RFC 3501 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (day may be space-padded)
_DATE_TIME = re.compile(r"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                       "Sep", "Oct", "Nov", "Dec"), 1)}


def parse_fetch(untagged: Sequence[Sequence[Item]]) -> list[tuple[int, bytes, dt.datetime | None]]:
    """(UID, BODY[], INTERNALDATE) of every FETCH response, in order.

    The common shape — metadata atoms then one ``BODY[] {n}`` literal — is read with one
    regular expression; anything else (another order, extra items, odd servers) goes
    through imapclient's tested response parser.
    """
    found: list[tuple[int, bytes, dt.datetime | None]] = []
    slow: list[bytes | tuple[bytes, bytes]] = []
    for response in untagged:
        first = response[0]
        if not isinstance(first, tuple):
            if _FETCH_HEAD.match(first):
                slow.append(_FETCH_HEAD.sub(rb"\1 ", first, count=1))
            continue
        match = _FAST_FETCH.match(first[0])
        if match and len(response) == 2 and response[1] == b")":
            found.append((int(match.group(1)), first[1], _internal_date(match.group(2))))
            continue
        if not _FETCH_HEAD.match(first[0]):
            continue
        slow.append((_FETCH_HEAD.sub(rb"\1 ", first[0], count=1), first[1]))
        slow.extend(response[1:])
    if slow:
        parsed = parse_fetch_response(slow, normalise_times=False, uid_is_key=True)
        for uid, data in parsed.items():
            body = data.get(b"BODY[]")
            if isinstance(uid, int) and isinstance(body, bytes):
                found.append((uid, body, _internal_date(data.get(b"INTERNALDATE"))))
    return found


class ImapSource:
    """A mailbox's IMAP folders as a `MailSource` (incremental, crash-safe, push-capable).

    One connection per run. Each folder is opened read-only (EXAMINE) unless processed
    mail is flagged, moved or deleted. New mail is found from the cursor: with CONDSTORE
    (RFC 7162) an unchanged HIGHESTMODSEQ and UIDNEXT end the poll after one command;
    otherwise ``UID SEARCH UID <last+1>:*`` lists what is new, fetched in batches of
    ``UID FETCH <set> (UID INTERNALDATE BODY.PEEK[])`` while the previous batch is being
    stored (one batch is always in flight). ``\\Seen`` is never read nor changed.

    A changed UIDVALIDITY yields the whole folder again with ``reset=True``; the service
    matches those messages to activities by Message-ID (or content hash), so nothing is
    duplicated. The runtime's push uses `wait_for_changes` (IMAP IDLE) on the same
    connection.
    """

    def __init__(self, profile: Profile, mailbox: Mailbox, login: Login,
                 options: ConnectOptions, *, readonly: bool = True) -> None:
        assert profile.incoming is not None
        self.profile = profile
        self.mailbox = mailbox
        self.login = login
        self.options = options
        self.readonly = readonly
        self.client = ImapClient(profile.incoming, options)
        self.condstore = False
        self._names: dict[str, str] = {}
        self._status: dict[str, FolderState] = {}  # from resolve_folder, used once by fetch
        self._selected: str | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        await self.client.connect()
        await self.client.login(self.login)
        enabled = await self.client.enable("QRESYNC", "CONDSTORE")
        self.condstore = bool(enabled & {"QRESYNC", "CONDSTORE"}) or \
            "CONDSTORE" in self.client.capabilities

    async def close(self) -> None:
        await self.client.logout()

    # `connectors.imapsessions.Reusable`: kept logged in between runs

    def usable(self) -> bool:
        return self.client.usable()

    async def recycle(self) -> bool:
        """Leave the selected folder and forget per-run state; the login stays."""
        self._names.clear()
        self._status.clear()
        if self._selected is not None:
            if "UNSELECT" not in self.client.capabilities:  # RFC 3691
                return False  # CLOSE could expunge: rather log in again next time
            await self.client.command("UNSELECT")
            self._selected = None
        return True

    async def resolve_folder(self, folder: str) -> str:
        """The server's name of a configured folder (shared namespace for a delegate)."""
        if folder in self._names:
            return self._names[folder]
        names = (shared_folder(self.options, self.login.target, folder)
                 if self.login.mode is AccessMode.DELEGATION else [folder])
        last = ""
        items = ("MESSAGES", "UIDNEXT", "UIDVALIDITY") + (
            ("HIGHESTMODSEQ",) if self.condstore else ())
        for name in names:
            try:
                found = await self.client.status(name, items)
            except ImapNo as exc:
                last = exc.text
                continue
            self._names[folder] = name
            if "UIDVALIDITY" in found and self._selected != folder:
                # STATUS of the selected folder may lag (RFC 3501 §6.3.10): not used then
                self._status[folder] = FolderState(
                    found["UIDVALIDITY"], found.get("UIDNEXT"), found.get("MESSAGES", 1),
                    found.get("HIGHESTMODSEQ"))
            return name
        raise PermanentError(
            f"folder {folder!r} of {self.mailbox.address} is not on the server any more "
            f"(renamed or deleted?): {last}",
            fix=f"rename it back, or change the mailbox's folder list (now "
                f"{', '.join(self.mailbox.folders)}); its sync position is kept",
            code="folder-missing")

    async def sent_folder(self) -> str | None:
        """The folder marked ``\\Sent`` (RFC 6154 SPECIAL-USE), else one named Sent."""
        prefix = ""
        if self.login.mode is AccessMode.DELEGATION:
            prefix = self.options.shared_namespace.format(user=self.login.target)
        response = await self.client.command("LIST", quote(prefix), b"*")
        fallback = None
        for line in response.lines(b"LIST"):
            first = line[0]
            head = first if isinstance(first, bytes) else first[0]
            name = None if isinstance(first, bytes) else first[1].decode()
            match = _LIST.match(head)
            if not match:
                continue
            flags = match.group(1).decode().lower()
            raw = match.group(2).decode() if name is None else name
            name = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\") if raw.startswith('"') \
                else raw
            local = name[len(prefix):] if prefix and name.startswith(prefix) else name
            if "\\sent" in flags:
                return local
            if local.lower() in ("sent", "sent items", "sent messages"):
                fallback = local
        return fallback

    async def _select(self, folder: str) -> FolderState:
        name = await self.resolve_folder(folder)
        extra = (b"(CONDSTORE)",) if self.condstore else ()
        try:
            response = await self.client.select(name, readonly=self.readonly, extra=extra)
        except ImapNo as exc:
            self._names.pop(folder, None)
            raise PermanentError(f"folder {folder!r} of {self.mailbox.address} cannot be "
                                 f"opened ({exc.text})",
                                 fix="check that it exists and that the login may read it",
                                 code="folder-missing") from None
        self._selected = folder
        return folder_state(response)

    async def fetch(self, folder: str, cursor: FolderCursor | None, *, batch_size: int,
                    known: KnownFilter) -> AsyncGenerator[FetchBatch, None]:
        # The no-change poll: the STATUS that resolved the folder this run already says
        # whether anything is new, without selecting it.
        status = self._status.pop(folder, None)
        if status is not None and cursor is not None and _unchanged(status, cursor):
            final = FolderCursor(status.uidvalidity, cursor.last_uid, status.highest_modseq)
            if final != cursor:
                yield FetchBatch(folder, [], final)
            return
        async with self._lock:
            state = await self._select(folder)
        reset = cursor is not None and cursor.uidvalidity not in (None, state.uidvalidity)
        last = 0 if cursor is None or reset else cursor.last_uid
        final = FolderCursor(state.uidvalidity, last, state.highest_modseq)
        if cursor is not None and _unchanged(state, cursor):
            if final != cursor:
                yield FetchBatch(folder, [], final)
            return
        async with self._lock:
            response = await self.client.uid("SEARCH", b"UID", b"%d:*" % (last + 1))
        uids = sorted({int(u) for line in response.lines(b"SEARCH")
                       for u in _head(line).split()[2:] if u.isdigit() and int(u) > last})
        chunks = [uids[i:i + batch_size] for i in range(0, len(uids), batch_size)]
        pending = asyncio.create_task(self._fetch_chunk(folder, state, chunks[0])) \
            if chunks else None
        for i, chunk in enumerate(chunks):
            assert pending is not None
            messages = await pending
            pending = asyncio.create_task(self._fetch_chunk(folder, state, chunks[i + 1])) \
                if i + 1 < len(chunks) else None
            done = i + 1 == len(chunks)
            try:
                yield FetchBatch(folder, messages, FolderCursor(
                    state.uidvalidity, chunk[-1],
                    state.highest_modseq if done else (None if reset or cursor is None
                                                       else cursor.highest_modseq)),
                    reset=reset and i == 0)
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
        if not chunks and final != cursor:
            yield FetchBatch(folder, [], final, reset=reset)

    async def _fetch_chunk(self, folder: str, state: FolderState,
                           uids: Sequence[int]) -> list[RemoteMessage]:
        async with self._lock:
            if self._selected != folder:
                await self._select(folder)
            response = await self.client.uid(
                "FETCH", uid_set(uids), b"(UID INTERNALDATE BODY.PEEK[])")
        wanted = set(uids)
        return [RemoteMessage(folder, f"{state.uidvalidity}:{uid}", raw, uid, date)
                for uid, raw, date in sorted(parse_fetch(response.untagged))
                if uid in wanted]

    async def finish(self, folder: str, dispositions: Sequence[Disposition]) -> None:
        """Flag, move or delete processed messages (leave needs nothing)."""
        groups: dict[tuple[str, str | None], list[int]] = {}
        for d in dispositions:
            if d.action != "leave":
                groups.setdefault((d.action, d.folder), []).append(
                    int(d.remote_id.rpartition(":")[2]))
        if not groups:
            return
        if self.readonly:
            raise PermanentError("IMAP source opened read-only cannot apply "
                                 "after-processing actions", code="imap-state")
        async with self._lock:
            if self._selected != folder:
                await self._select(folder)
            for (action, target), uids in groups.items():
                await self._apply(action, target, uid_set(sorted(uids)))

    async def _apply(self, action: str, target: str | None, uids: bytes) -> None:
        c = self.client
        if action == "flag":
            await c.uid("STORE", uids, b"+FLAGS.SILENT", b"(\\Flagged)")
            return
        if action == "move" and target:
            name = target if self.login.mode is not AccessMode.DELEGATION else \
                self.options.shared_namespace.format(user=self.login.target) + target
            created = await c.command("CREATE", quote(name.encode()), check=False)
            if created.status != "OK" and "ALREADYEXISTS" not in created.text.upper() \
                    and "EXISTS" not in created.text.upper():
                raise PermanentError(f"cannot create folder {target!r}: {created.text}",
                                     fix="create it on the server or grant the right to",
                                     code="folder-create")
            if "MOVE" in c.capabilities:
                await c.uid("MOVE", uids, quote(name.encode()))
                return
            await c.uid("COPY", uids, quote(name.encode()))
        await c.uid("STORE", uids, b"+FLAGS.SILENT", b"(\\Deleted)")
        if "UIDPLUS" in c.capabilities:
            await c.uid("EXPUNGE", uids)
        else:
            await c.command("EXPUNGE")

    async def wait_for_changes(self, folder: str, wait: float) -> list[bytes]:
        """IMAP IDLE on ``folder`` until it reports a change or ``wait`` seconds pass.

        For the runtime's push: select the folder, IDLE, and return the server's untagged
        notifications (``* 12 EXISTS`` ...); then run the channel job to fetch the mail.
        """
        async with self._lock:
            if self._selected != folder:
                await self._select(folder)
            return await self.client.idle_once(wait)


def _unchanged(state: FolderState, cursor: FolderCursor) -> bool:
    """Nothing new since ``cursor``: same UIDVALIDITY, and no UID past it (or no message)."""
    if cursor.uidvalidity not in (None, state.uidvalidity):
        return False  # UIDVALIDITY reset: the folder is read again
    return ((state.uidnext is not None and state.uidnext <= cursor.last_uid + 1)
            or (state.highest_modseq is not None
                and state.highest_modseq == cursor.highest_modseq)
            or state.exists == 0)


def _head(line: Sequence[Item]) -> bytes:
    first = line[0]
    return first if isinstance(first, bytes) else first[0]


def source(profile: Profile, mailbox: Mailbox, login: Login,
           options: ConnectOptions) -> ImapSource:
    """The incoming source of a mailbox: read-only unless processed mail is changed."""
    readonly = mailbox.after_processing is AfterProcessing.LEAVE and \
        not profile.move_failed_to_folder
    return ImapSource(profile, mailbox, login, options, readonly=readonly)
