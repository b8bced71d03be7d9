"""The backends of the channel contract: one small adapter per server kind.

Each adapter puts one kind of server behind the same few operations, so that the contract
tests (`tests/contract/test_*.py`) are written once and run against every kind:

* **set-up through `Services`**: the profile(s) and mailboxes are applied as a manifest, the
  way an administrator configures them, and the channels under test are enabled;
* **the server side of mail**: deliver a message into a user's inbox as transport would,
  count what the server accepted for delivery and what it filed in Sent;
* **the server side of appointments, contacts and tasks**: list, create, edit and delete
  items as another client of the mailbox (Outlook, a phone) would, and plant an item that
  cannot be read.

``imap`` is the real Dovecot (IMAP), Postfix (submission) and Radicale (CalDAV/CardDAV) on
loopback, reached through the helpers of `tests.testservers`; its users ``kim`` and ``leo``
belong to this suite alone. ``ews`` and ``graph`` are the loopback fakes of
`tests.fakes.ews_server` and `tests.fakes.graph_server`, one fresh server per test. All
three use their service account the same way: Dovecot master user / SASL authzid and svc's
DAV rights, EWS ApplicationImpersonation, Graph app-only tokens.
"""

from __future__ import annotations

import abc
import datetime as dt
import email.utils
import itertools
import re
import time
from dataclasses import replace
from typing import Any, ClassVar

from lxml import etree

from serversync.connectors import ical
from serversync.core.act import Appointment, Contact, ItemKind, Record, Task
from serversync.core.model import Channel
from serversync.manifest import Manifest, validate
from serversync.services import Services
from tests import testservers as ts
from tests.fakes.ews_server import EwsServer, T
from tests.fakes.graph_server import GraphServer

OUTSIDER = "olga@customer.test"  # the sender of delivered mail: a known contact
START = (dt.datetime.now(dt.UTC) + dt.timedelta(days=20)).replace(hour=9, minute=0, second=0,
                                                                   microsecond=0)
TRACKED = "Tracked to serversync"  # the EWS tracking category (connectors.ews_items)
_serial = itertools.count(1)


def message(to: str, subject: str, *, sender: str = OUTSIDER) -> tuple[str, bytes]:
    """(Message-ID, raw message) of a plain message from outside."""
    mid = email.utils.make_msgid(domain="contract.test")
    raw = (f"From: Olga <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Date: {email.utils.formatdate()}\r\nMessage-ID: {mid}\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n").encode()
    return mid, raw


def title(record: Record) -> str:
    """The field every backend shows in its list: subject, or a contact's full name."""
    return record.full_name if isinstance(record, Contact) else record.subject


def sample(kind: ItemKind, uid: str, text: str, owner: str) -> Record:
    """A plain record of ``kind`` whose title is ``text``."""
    if kind is ItemKind.APPOINTMENT:
        return Appointment(uid=uid, subject=text, start=START, end=START + dt.timedelta(hours=1),
                           location="Room 1", organizer=owner, owner=owner)
    if kind is ItemKind.CONTACT:
        given, _, family = text.partition(" ")
        return Contact(uid=uid, full_name=text, given_name=given, family_name=family,
                       emails=(f"{given.lower() or 'x'}@customer.test",), owner=owner)
    return Task(uid=uid, subject=text, due=START, priority=1, owner=owner)


def retitled(record: Record, text: str) -> Record:
    """``record`` with another title."""
    if isinstance(record, Contact):
        return replace(record, full_name=text)
    return replace(record, subject=text)


class Backend(abc.ABC):
    """One server kind behind the contract's operations (see the module docstring)."""

    kind: ClassVar[str]
    user: str  # the mailbox under test
    other: str  # a second mailbox of the same organisation
    recipient: str  # an address outgoing mail is delivered to
    bad_login_code: str  # the alert code of a mailbox whose credentials are wrong
    refusal: str  # what the server says when it refuses a recipient (see `refuse`)
    has_delegation: ClassVar[bool] = True

    def __init__(self, services: Services) -> None:
        self.services = services
        self.db = services.db

    # ------------------------------------------------------------ set-up through Services

    @abc.abstractmethod
    def profiles(self, policy: str) -> list[dict[str, Any]]:
        """The profiles: "contract" (the service account), and the variants the tests need."""

    def mailbox(self, address: str, channels: tuple[Channel, ...],
                profile: str = "contract") -> dict[str, Any]:
        spec: dict[str, Any] = {"address": address, "owner": address.split("@")[0],
                                "profile": profile, "approval": "approved",
                                "tracking_rule": "all"}
        for channel in channels:
            spec[channel.value] = "server-side"
        return spec

    @abc.abstractmethod
    def bad_login(self, address: str, channels: tuple[Channel, ...]) -> dict[str, Any]:
        """A mailbox whose login the server refuses (a wrong password or client secret)."""

    def delegation(self, address: str) -> dict[str, Any]:
        """A mailbox on the "deleg" profile (Use Impersonation = No) with ACT asked for."""
        return self.mailbox(address, (Channel.ACT,), profile="deleg")

    async def setup(self, *channels: Channel, others: bool = False, bad: bool = False,
                    policy: str = "application-wins") -> None:
        """Apply profiles and mailboxes (``user``; ``other`` too, or ``other`` with a login
        the server refuses) through `Services.apply`, then enable ``channels``."""
        self.prepare(channels)
        boxes = [self.mailbox(self.user, channels)]
        if others:
            boxes.append(self.mailbox(self.other, channels))
        elif bad:
            boxes.append(self.bad_login(self.other, channels))
        directory = [{"kind": "user", "key": b["owner"], "emails": [b["address"]]}
                     for b in boxes]
        directory.append({"kind": "contact", "key": "c-olga", "emails": [OUTSIDER]})
        await self.services.apply(validate(Manifest, {
            "directory": directory, "profiles": self.profiles(policy), "mailboxes": boxes}))
        async with self.db.transaction() as repo:
            for box in boxes:
                for channel in channels:
                    await repo.set_channel(box["address"], channel, enabled=True)

    def prepare(self, channels: tuple[Channel, ...]) -> None:  # noqa: B027 (fakes start empty)
        """Leave the server side the channels use empty (a fresh fake already is)."""

    # ------------------------------------------------------------ mail on the server side

    @abc.abstractmethod
    def deliver(self, to: str, raw: bytes) -> None:
        """Put a message in ``to``'s inbox, as transport would."""

    @abc.abstractmethod
    def refuse(self) -> str:
        """An address the server refuses permanently when sent to."""

    @abc.abstractmethod
    def accepted(self, message_id: str, *, expected: bool = True) -> int:
        """How many times the server took the message with this Message-ID for delivery
        (``expected``: it should have, so a real server is given time to deliver it)."""

    @abc.abstractmethod
    def sent_copies(self, message_id: str) -> int:
        """How many copies of the message ``user``'s Sent folder holds."""

    def requests(self) -> int | None:
        """Requests the server has seen so far (None: a real server that does not say)."""
        return None

    # ------------------------------------------------------------ items on the server side

    @abc.abstractmethod
    def items(self, kind: ItemKind) -> dict[str, str]:
        """UID (as the application sees it) → title of ``user``'s server items of ``kind``."""

    @abc.abstractmethod
    def create(self, kind: ItemKind, text: str) -> str:
        """Create an item as another client would; returns the UID the application will see."""

    @abc.abstractmethod
    def edit(self, kind: ItemKind, uid: str, text: str) -> None:
        """Change an item's title as another client would."""

    @abc.abstractmethod
    def remove(self, kind: ItemKind, uid: str) -> None:
        """Delete an item as another client would."""

    @abc.abstractmethod
    def plant_broken(self) -> str:
        """Put a calendar item on the server that cannot be read; returns words the
        quarantine alert's message contains."""

    def close(self) -> None:  # noqa: B027 (the real servers need no stopping)
        """Stop what the adapter started."""


# ---------------------------------------------------------------- Dovecot, Postfix, Radicale

_DAV_COLLECTIONS = {ItemKind.APPOINTMENT: "calendar", ItemKind.CONTACT: "contacts",
                    ItemKind.TASK: "tasks"}
_BAD_TZ = (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:broken\r\n"
           b"DTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Mars/Olympus:20260105T090000\r\n"
           b"SUMMARY:Broken\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


class ImapBackend(Backend):
    """The real loopback servers: Dovecot IMAP, Postfix submission, Radicale DAV."""

    kind = "imap"
    user, other = "kim@example.test", "leo@example.test"
    recipient = "leo@example.test"
    bad_login_code = "auth-failed"
    refusal = "550"

    def prepare(self, channels: tuple[Channel, ...]) -> None:
        if Channel.INCOMING in channels or Channel.OUTGOING in channels:
            for address in (self.user, self.other):
                ts.reset_mailbox(address)
        if Channel.ACT in channels:
            ts.reset_dav(self.user)

    def _base(self) -> dict[str, Any]:
        return {"kind": "imap", "ca_file": str(ts.CA_FILE), "allow_plaintext": True,
                "incoming": {"host": ts.HOST, "port": ts.IMAP_PORT, "tls": "starttls"},
                "outgoing": {"host": ts.HOST, "port": ts.SUBMISSION_PORT, "tls": "starttls"},
                "dav_url": ts.DAV_URL}

    def profiles(self, policy: str) -> list[dict[str, Any]]:
        base = self._base()
        return [
            {**base, "name": "contract", "credential_source": "profile",
             "service_user": ts.SVC, "service_secret": ts.USERS[ts.SVC],
             "use_impersonation": True, "conflict_policy": policy},
            {**base, "name": "own", "credential_source": "mailbox"},
            {**base, "name": "deleg", "credential_source": "profile", "service_user": ts.SVC,
             "service_secret": ts.USERS[ts.SVC], "use_impersonation": False},
        ]

    def bad_login(self, address: str, channels: tuple[Channel, ...]) -> dict[str, Any]:
        return {**self.mailbox(address, channels, profile="own"), "allow_credentials": True,
                "secret": "not-the-password"}

    def deliver(self, to: str, raw: bytes) -> None:
        ts.deliver_lmtp(to, raw)

    def refuse(self) -> str:
        return "nobody@example.test"  # not in Postfix's vmailbox: 550 at RCPT

    def _count(self, user: str, message_id: str, folder: str) -> int:
        conn = ts.master_login(user)
        try:
            conn.select(ts.quote(folder), readonly=True)
            typ, data = conn.uid("SEARCH", "HEADER", "Message-ID", ts.quote(message_id))
            assert typ == "OK", data
            return len(data[0].split()) if data and data[0] else 0
        finally:
            conn.logout()

    def accepted(self, message_id: str, *, expected: bool = True) -> int:
        # Postfix hands accepted mail to Dovecot over LMTP within milliseconds; a second copy
        # would follow as fast, so wait for the first and then a little longer
        if not expected:  # a refused recipient: Postfix took nothing, no copy can follow
            return self._count(self.recipient, message_id, "INBOX")
        try:
            ts.wait_for_message(self.recipient, message_id, timeout=5)
        except TimeoutError:
            return 0
        time.sleep(0.25)
        return self._count(self.recipient, message_id, "INBOX")

    def sent_copies(self, message_id: str) -> int:
        return self._count(self.user, message_id, "Sent")

    # ---- Radicale, as svc (RrWw on every collection)

    def _listing(self, kind: ItemKind) -> dict[str, bytes]:
        collection = _DAV_COLLECTIONS[kind]
        vcard = kind is ItemKind.CONTACT
        query = "A:addressbook-query" if vcard else "C:calendar-query"
        body = (f'<?xml version="1.0"?><{query} xmlns:D="DAV:" '
                'xmlns:C="urn:ietf:params:xml:ns:caldav" '
                'xmlns:A="urn:ietf:params:xml:ns:carddav"><D:prop><D:getetag/>'
                f'{"<A:address-data/>" if vcard else "<C:calendar-data/>"}</D:prop>'
                + ("" if vcard else '<C:filter><C:comp-filter name="VCALENDAR"/></C:filter>')
                + f"</{query}>")
        status, data = ts.dav_request("REPORT", f"/{self.user}/{collection}/", body=body,
                                      headers={"Depth": "1", "Content-Type": "application/xml"})
        if status == 404:
            return {}
        assert status == 207, data
        out = {}
        for response in re.findall(r"<(?:\w+:)?response>(.*?)</(?:\w+:)?response>",
                                   data.decode(), re.S):
            href = re.search(r"<(?:\w+:)?href>([^<]+)<", response)
            content = re.search(r"<(?:\w+:)?(?:calendar|address)-data[^>]*>(.*?)</", response,
                                re.S)
            if href and content:
                raw = content.group(1).replace("&#13;", "\r").replace("&lt;", "<") \
                    .replace("&gt;", ">").replace("&amp;", "&")
                out[href.group(1)] = raw.encode()
        return out

    def _records(self, kind: ItemKind) -> dict[str, tuple[str, Record]]:
        """UID → (href, record) of the readable items."""
        out = {}
        for href, raw in self._listing(kind).items():
            try:
                record = ical.parse(raw, vcard=kind is ItemKind.CONTACT)
            except Exception:  # the planted broken item
                continue
            out[record.uid] = (href, record)
        return out

    def _put(self, path: str, kind: ItemKind, data: bytes) -> None:
        content_type = "text/vcard" if kind is ItemKind.CONTACT else "text/calendar"
        status, body = ts.dav_request("PUT", path, body=data,
                                      headers={"Content-Type": content_type})
        assert status in (201, 204), body

    def items(self, kind: ItemKind) -> dict[str, str]:
        return {uid: title(record) for uid, (_, record) in self._records(kind).items()}

    def create(self, kind: ItemKind, text: str) -> str:
        uid = f"srv-{kind.value}-{next(_serial)}"
        suffix = "vcf" if kind is ItemKind.CONTACT else "ics"
        self._put(f"/{self.user}/{_DAV_COLLECTIONS[kind]}/{uid}.{suffix}", kind,
                  ical.render(sample(kind, uid, text, self.user)))
        return uid

    def edit(self, kind: ItemKind, uid: str, text: str) -> None:
        href, record = self._records(kind)[uid]
        self._put(href, kind, ical.render(retitled(record, text)))

    def remove(self, kind: ItemKind, uid: str) -> None:
        href, _ = self._records(kind)[uid]
        status, body = ts.dav_request("DELETE", href)
        assert status in (200, 204), body

    def plant_broken(self) -> str:
        # Radicale stores an unknown TZID as it is; our parser refuses it
        self._put(f"/{self.user}/calendar/broken.ics", ItemKind.APPOINTMENT, _BAD_TZ)
        return "Mars/Olympus"


# ---------------------------------------------------------------- Exchange (EWS) fake

_EWS_TAGS = {ItemKind.APPOINTMENT: ("calendar", "CalendarItem", "Subject"),
             ItemKind.CONTACT: ("contacts", "Contact", "DisplayName"),
             ItemKind.TASK: ("tasks", "Task", "Subject")}


def _ews_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EwsBackend(Backend):
    """`tests.fakes.ews_server`: the service account holds ApplicationImpersonation."""

    kind = "ews"
    svc, user, other = "svc@corp.test", "kim@corp.test", "leo@corp.test"
    recipient = "dave@customer.test"
    bad_login_code = "auth-failed"
    refusal = "ErrorInvalidRecipients"
    PASSWORDS: ClassVar[dict[str, str]] = {
        "svc@corp.test": "svc-Secr3t!", "kim@corp.test": "kim-Secr3t!",
        "leo@corp.test": "leo-Secr3t!"}

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.server = EwsServer().start()
        for address, password in self.PASSWORDS.items():
            self.server.add_user(address, password, mailbox=address != self.svc)
        self.server.impersonators.add(self.svc)

    def close(self) -> None:
        self.server.stop()
        assert not self.server.http.errors, self.server.http.errors

    def profiles(self, policy: str) -> list[dict[str, Any]]:
        base = {"kind": "exchange", "ews_url": self.server.url, "allow_plaintext": True}
        service = {"credential_source": "profile", "service_user": self.svc,
                   "service_secret": self.PASSWORDS[self.svc]}
        return [
            {**base, **service, "name": "contract", "use_impersonation": True,
             "conflict_policy": policy},
            {**base, "name": "own", "credential_source": "mailbox"},
            {**base, **service, "name": "deleg", "use_impersonation": False},
        ]

    def bad_login(self, address: str, channels: tuple[Channel, ...]) -> dict[str, Any]:
        return {**self.mailbox(address, channels, profile="own"), "allow_credentials": True,
                "secret": "not-the-password"}

    def deliver(self, to: str, raw: bytes) -> None:
        self.server.deliver(to, raw)

    def refuse(self) -> str:
        address = "nobody@customer.test"
        self.server.invalid_recipients.add(address)
        return address

    def accepted(self, message_id: str, *, expected: bool = True) -> int:
        return sum(1 for _, mime in self.server.sent if _message_id(mime) == message_id)

    def sent_copies(self, message_id: str) -> int:
        return sum(1 for item in self.server.folder_items(self.user, "sentitems")
                   if item.element.findtext(f"{{{T}}}InternetMessageId") == message_id)

    def requests(self) -> int | None:
        return len(self.server.requests)

    @staticmethod
    def _uid(item_id: str, element: etree._Element) -> str:
        uid = element.findtext(f"{{{T}}}UID")
        for prop in element.iter(f"{{{T}}}ExtendedProperty"):
            uri = prop.find(f"{{{T}}}ExtendedFieldURI")
            if uri is not None and uri.get("PropertyName") == "serversync-uid":
                uid = prop.findtext(f"{{{T}}}Value")
        return uid or item_id

    def _find(self, kind: ItemKind) -> dict[str, str]:
        """UID → ItemId of the tracked items in the folder of ``kind``."""
        folder = _EWS_TAGS[kind][0]
        return {self._uid(i.id, i.element): i.id
                for i in self.server.folder_items(self.user, folder)}

    def items(self, kind: ItemKind) -> dict[str, str]:
        folder, _, field = _EWS_TAGS[kind]
        return {self._uid(i.id, i.element): i.element.findtext(f"{{{T}}}{field}") or ""
                for i in self.server.folder_items(self.user, folder)}

    def _element(self, kind: ItemKind, text: str, *, start: bool = True) -> etree._Element:
        _, tag, field = _EWS_TAGS[kind]
        element = etree.Element(f"{{{T}}}{tag}", nsmap={"t": T})
        etree.SubElement(element, f"{{{T}}}{field}").text = text
        categories = etree.SubElement(element, f"{{{T}}}Categories")
        etree.SubElement(categories, f"{{{T}}}String").text = TRACKED
        if kind is ItemKind.CONTACT:
            given, _, family = text.partition(" ")
            etree.SubElement(element, f"{{{T}}}GivenName").text = given
            etree.SubElement(element, f"{{{T}}}Surname").text = family
        elif kind is ItemKind.TASK:
            etree.SubElement(element, f"{{{T}}}Status").text = "NotStarted"
        elif start:
            etree.SubElement(element, f"{{{T}}}Start").text = _ews_time(START)
            etree.SubElement(element, f"{{{T}}}End").text = _ews_time(
                START + dt.timedelta(hours=1))
        return element

    def create(self, kind: ItemKind, text: str) -> str:
        element = self._element(kind, text)
        uid = None
        if kind is ItemKind.APPOINTMENT:  # Exchange gives every calendar item a UID
            uid = f"040000008200E00074C5B7101A82E008{next(_serial):08X}"
            etree.SubElement(element, f"{{{T}}}UID").text = uid
        item_id = self.server.add_item(self.user, _EWS_TAGS[kind][0], element)
        return uid or item_id

    def edit(self, kind: ItemKind, uid: str, text: str) -> None:
        self.server.change(self.user, self._find(kind)[uid], _EWS_TAGS[kind][2], text)

    def remove(self, kind: ItemKind, uid: str) -> None:
        self.server.remove(self.user, self._find(kind)[uid])

    def plant_broken(self) -> str:
        self.server.add_item(self.user, "calendar",
                             self._element(ItemKind.APPOINTMENT, "Broken", start=False))
        return "no start or end"


# ---------------------------------------------------------------- Exchange Online (Graph) fake

_GRAPH_COLLECTIONS = {ItemKind.APPOINTMENT: ("events", "subject"),
                      ItemKind.CONTACT: ("contacts", "displayName"),
                      ItemKind.TASK: ("todo:tasks-default", "title")}
UID_PROPERTY_NAME = "name serversync-uid"


def _graph_time(moment: dt.datetime) -> dict[str, str]:
    return {"dateTime": moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": "UTC"}


class GraphBackend(Backend):
    """`tests.fakes.graph_server`: an app with the application permissions, app-only tokens."""

    kind = "graph"
    user, other = "kim@contoso.test", "leo@contoso.test"
    recipient = "dave@customer.test"
    bad_login_code = "bad-client-secret"
    refusal = "ErrorInvalidRecipients"
    has_delegation = False  # Exchange Online profiles are app-only (seed rule)
    APP, SECRET = "11111111-2222-3333-4444-555555555555", "graph~Secr3t.value"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.server = GraphServer().start()
        self.server.add_app(self.APP, self.SECRET)
        for address in (self.user, self.other):
            self.server.add_user(address)

    def close(self) -> None:
        self.server.stop()
        assert not self.server.http.errors, self.server.http.errors

    def _base(self) -> dict[str, Any]:
        return {"kind": "exchange-online", "credential_source": "app",
                "tenant_id": self.server.tenant, "client_id": self.APP,
                "client_secret": self.SECRET, "token_url": self.server.token_url,
                "api_url": self.server.api_url, "allow_plaintext": True}

    def profiles(self, policy: str) -> list[dict[str, Any]]:
        return [{**self._base(), "name": "contract", "conflict_policy": policy},
                # a secret that was replaced in Entra ID: the token endpoint refuses it
                {**self._base(), "name": "stale", "client_secret": "an-old-secret"}]

    def bad_login(self, address: str, channels: tuple[Channel, ...]) -> dict[str, Any]:
        return self.mailbox(address, channels, profile="stale")

    def deliver(self, to: str, raw: bytes) -> None:
        self.server.deliver(to, raw)

    def refuse(self) -> str:
        address = "nobody@customer.test"
        self.server.invalid_recipients.add(address)
        return address

    def accepted(self, message_id: str, *, expected: bool = True) -> int:
        return sum(1 for _, mime in self.server.sent if _message_id(mime) == message_id)

    def sent_copies(self, message_id: str) -> int:
        sent = self.server.users[self.user].collection("sentitems").items.values()
        return sum(1 for item in sent if item.get("internetMessageId") == message_id)

    def requests(self) -> int | None:
        return len(self.server.requests)

    @staticmethod
    def _uid(item: dict[str, Any]) -> str:
        for prop in item.get("singleValueExtendedProperties") or []:
            if str(prop.get("id", "")).lower().endswith(UID_PROPERTY_NAME) and prop.get("value"):
                return str(prop["value"])
        for extension in item.get("extensions") or []:
            if extension.get("uid"):
                return str(extension["uid"])
        return str(item["id"])

    def _find(self, kind: ItemKind) -> dict[str, dict[str, Any]]:
        collection = _GRAPH_COLLECTIONS[kind][0]
        items = self.server.users[self.user].collection(collection).items.values()
        return {self._uid(item): item for item in items}

    def items(self, kind: ItemKind) -> dict[str, str]:
        field = _GRAPH_COLLECTIONS[kind][1]
        return {uid: str(item.get(field) or "") for uid, item in self._find(kind).items()}

    def create(self, kind: ItemKind, text: str) -> str:
        collection, field = _GRAPH_COLLECTIONS[kind]
        body: dict[str, Any] = {field: text}
        if kind is ItemKind.APPOINTMENT:
            body.update(start=_graph_time(START), end=_graph_time(START + dt.timedelta(hours=1)))
        elif kind is ItemKind.CONTACT:
            given, _, family = text.partition(" ")
            body.update(givenName=given, surname=family)
        else:
            body["status"] = "notStarted"
        # made in Outlook or To Do: no UID of ours, so the application sees the Graph id
        return str(self.server.put(self.user, collection, body)["id"])

    def edit(self, kind: ItemKind, uid: str, text: str) -> None:
        collection, field = _GRAPH_COLLECTIONS[kind]
        self.server.put(self.user, collection, {field: text}, str(self._find(kind)[uid]["id"]))

    def remove(self, kind: ItemKind, uid: str) -> None:
        collection = _GRAPH_COLLECTIONS[kind][0]
        self.server.remove(self.user, collection, str(self._find(kind)[uid]["id"]))

    def plant_broken(self) -> str:
        self.server.put(self.user, "events", {"subject": "Broken"})  # no start, no end
        return "no start or end"


def _message_id(mime: bytes) -> str:
    head = mime.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    found = re.search(r"^Message-ID:[ \t]*(<[^>\r\n]+>)", head, re.I | re.M)
    return found.group(1) if found else ""


BACKENDS: dict[str, type[Backend]] = {"imap": ImapBackend, "ews": EwsBackend,
                                      "graph": GraphBackend}
__all__ = ["BACKENDS", "OUTSIDER", "START", "Backend", "message", "retitled", "sample",
           "title"]
