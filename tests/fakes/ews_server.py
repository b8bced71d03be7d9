"""A loopback Exchange Web Services endpoint (SOAP 1.1 over HTTP, Basic auth).

It implements the operations `serversync.connectors.ews` uses — GetFolder, SyncFolderItems,
GetItem, FindItem, CreateItem (messages with SendAndSaveCopy; calendar items, contacts and
tasks with SaveOnly), UpdateItem and DeleteItem; FindItem honours one restriction, ``IsEqualTo``
on ``message:InternetMessageId`` (the outgoing job's Sent Items lookup) — and the two access
types: the
``ExchangeImpersonation`` SOAP header (service account acting *as* a user) and delegate
access (the caller names another mailbox in ``DistinguishedFolderId/Mailbox``).

Shapes follow Microsoft's EWS reference (see ``tests/fixtures/ews/*.xml``, each naming the
page it is taken from). Errors are the documented ones: ``ErrorImpersonateUserDenied`` and
``ErrorNonExistentMailbox`` as SOAP faults, ``ErrorServerBusy`` as a fault with
``BackOffMilliseconds`` in ``MessageXml`` (HTTP 500), ``ErrorAccessDenied`` and
``ErrorItemNotFound`` / ``ErrorIrresolvableConflict`` / ``ErrorMessageSizeExceeded`` /
``ErrorInvalidRecipients`` as response messages.

Recurring calendar items follow the EWS reference pages on ``Recurrence`` (RecurrenceType),
``OccurrenceItemId``, ``ModifiedOccurrences``, ``DeletedOccurrences`` and ``TaskRecurrence``:
a series is one stored master (SyncFolderItems lists masters and single items, never
occurrences or exceptions); GetItem answers it with ``CalendarItemType``,
``FirstOccurrence``, ``LastOccurrence``, ``ModifiedOccurrences`` and ``DeletedOccurrences``,
computed by expanding the stored pattern with dateutil in the series' ``StartTimeZone`` (Windows
ids mapped through the CLDR table), independently of `serversync.core.recurrence`.
GetItem, UpdateItem and DeleteItem accept an ``OccurrenceItemId`` (``RecurringMasterId`` +
1-based ``InstanceIndex``, deleted occurrences keep their index) or an occurrence's own ItemId;
an update makes the occurrence an exception, a delete adds it to DeletedOccurrences, and both
change the master's ChangeKey and report it in SyncFolderItems. The documented refusals:
``ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange``,
``ErrorCalendarOccurrenceIsDeletedFromRecurrence`` and ``ErrorOccurrenceCrossingBoundary`` (an
occurrence moved to or past the day of its neighbour). Setting the master's Recurrence, Start or
End drops its exceptions and deleted occurrences, as [MS-OXOCAL] 3.1.4.7.3.5 says a changed
pattern does. Tasks keep their ``Recurrence`` (TaskRecurrenceType) as sent; they are not
expanded.

Only what our connector sends is understood; anything else is answered with
``ErrorInvalidOperation`` so a test notices at once.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import email.utils
import itertools
import threading
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from dateutil import rrule as du
from exchangelib.winzone import MS_TIMEZONE_TO_IANA_MAP
from lxml import etree

from tests.fakes.loopback import LoopbackServer, Recorded, Reply

S = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
NSMAP = {"s": S, "m": M, "t": T}
FOLDER_CLASSES = {"inbox": ("Folder", "IPF.Note"), "sentitems": ("Folder", "IPF.Note"),
                  "calendar": ("CalendarFolder", "IPF.Appointment"),
                  "contacts": ("ContactsFolder", "IPF.Contact"),
                  "tasks": ("TasksFolder", "IPF.Task"), "root": ("Folder", ""),
                  "msgfolderroot": ("Folder", "")}
ITEM_FOLDER = {"Message": "inbox", "CalendarItem": "calendar", "Contact": "contacts",
               "Task": "tasks"}


def _kids(element: etree._Element | None) -> list[etree._Element]:
    return [] if element is None else list(element)


def q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


class Fault(Exception):
    """Answer with a SOAP fault (HTTP 500), as Exchange does for request-level errors."""

    def __init__(self, code: str, message: str, backoff_ms: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.backoff_ms = code, message, backoff_ms


class ItemError(Exception):
    """Answer one response message with ResponseClass="Error"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Item:
    id: str
    folder: str
    element: etree._Element  # the t:Message / t:CalendarItem / ... without ItemId
    change: int = 1
    mime: bytes | None = None
    # a recurring master's exceptions (full copies of the occurrence) and deleted occurrences,
    # by 1-based instance index
    exceptions: dict[int, etree._Element] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)

    @property
    def change_key(self) -> str:
        return f"CK{self.change}"

    @property
    def kind(self) -> str:
        return etree.QName(self.element).localname


@dataclass
class Mailbox:
    address: str
    items: dict[str, Item] = field(default_factory=dict)
    # per folder: (sequence, "Create"|"Update"|"Delete", item id); SyncState = the sequence
    log: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)


class EwsServer:
    """The fake's state: accounts, rights, mailboxes; `server.requests` is the wire log."""

    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}
        self.impersonators: set[str] = set()  # accounts holding ApplicationImpersonation
        self.delegates: dict[str, set[str]] = {}  # mailbox -> accounts with delegate rights
        self.mailboxes: dict[str, Mailbox] = {}
        self.busy: list[int] = []  # back-off hints (ms) for the next requests: ErrorServerBusy
        # the same, for the next requests of one operation only (e.g. "CreateItem")
        self.busy_for: dict[str, list[int]] = {}
        self.max_message_bytes: int | None = None  # larger sends: ErrorMessageSizeExceeded
        self.invalid_recipients: set[str] = set()  # sends to these: ErrorInvalidRecipients
        self.sent: list[tuple[str, bytes]] = []  # (mailbox, MIME) submitted for delivery
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self.http = LoopbackServer(self.handle)

    # ------------------------------------------------------------ set-up helpers

    @property
    def url(self) -> str:
        return f"{self.http.base_url}/EWS/Exchange.asmx"

    @property
    def requests(self) -> list[Recorded]:
        return self.http.requests

    def start(self) -> EwsServer:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()

    def add_user(self, address: str, password: str, *, mailbox: bool = True) -> None:
        self.passwords[address] = password
        if mailbox:
            self.mailboxes.setdefault(address, Mailbox(address))

    def _new_id(self) -> str:
        return base64.b64encode(f"AAMk-{next(self._ids):06d}".encode()).decode()

    def _log(self, mailbox: Mailbox, folder: str, change: str, item_id: str) -> None:
        mailbox.log.setdefault(folder, []).append((next(self._seq), change, item_id))

    def deliver(self, address: str, mime: bytes, subject: str = "") -> str:
        """Put a message in a mailbox's Inbox, as transport would."""
        with self._lock:
            box = self.mailboxes[address]
            element = etree.Element(q(T, "Message"), nsmap={"t": T})
            etree.SubElement(element, q(T, "Subject")).text = subject
            etree.SubElement(element, q(T, "ItemClass")).text = "IPM.Note"
            item = Item(self._new_id(), "inbox", element, mime=mime)
            box.items[item.id] = item
            self._log(box, "inbox", "Create", item.id)
            return item.id

    def add_item(self, address: str, folder: str, element: etree._Element) -> str:
        """Put a calendar item, contact or task (``t:CalendarItem``, ...) in a folder, as a
        user creating it in Outlook would; returns its ItemId."""
        with self._lock:
            box = self.mailboxes[address]
            item = Item(self._new_id(), folder, _copy(element))
            box.items[item.id] = item
            self._log(box, folder, "Create", item.id)
            return item.id

    def change(self, address: str, item_id: str, tag: str, value: str) -> None:
        """Change one field on the server side (a user editing in Outlook)."""
        with self._lock:
            box = self.mailboxes[address]
            item = box.items[item_id]
            _set_child(item.element, tag, value)
            item.change += 1
            self._log(box, item.folder, "Update", item.id)

    def remove(self, address: str, item_id: str) -> None:
        with self._lock:
            box = self.mailboxes[address]
            item = box.items.pop(item_id)
            self._log(box, item.folder, "Delete", item.id)

    def folder_items(self, address: str, folder: str) -> list[Item]:
        return [i for i in self.mailboxes[address].items.values() if i.folder == folder]

    # ------------------------------------------------------------ HTTP

    def handle(self, request: Recorded) -> Reply:
        if request.method != "POST" or not request.path.startswith("/EWS/Exchange.asmx"):
            return Reply(404, b"not found")
        caller = self._authenticate(request)
        if caller is None:
            return Reply(401, b"", {"WWW-Authenticate": 'Basic realm="127.0.0.1"'})
        try:
            envelope = etree.fromstring(request.body)
        except etree.XMLSyntaxError:
            return Reply(400, b"bad xml")
        with self._lock:
            try:
                if self.busy:
                    raise Fault("ErrorServerBusy", "The server cannot service this request "
                                "right now. Try again later.", backoff_ms=self.busy.pop(0))
                acting = self._acting_as(envelope, caller)
                body = envelope.find(q(S, "Body"))
                assert body is not None
                operation = body[0]
                name = etree.QName(operation).localname
                if self.busy_for.get(name):
                    raise Fault("ErrorServerBusy", "The server cannot service this request "
                                "right now. Try again later.",
                                backoff_ms=self.busy_for[name].pop(0))
                handler = getattr(self, f"op_{name}", None)
                if handler is None:
                    raise Fault("ErrorInvalidOperation", f"{name} is not implemented by the fake")
                response = handler(operation, caller, acting)
            except Fault as fault:
                return Reply(500, _fault(fault), {"Content-Type": "text/xml; charset=utf-8"})
        return Reply(200, _envelope(response), {"Content-Type": "text/xml; charset=utf-8"})

    def _authenticate(self, request: Recorded) -> str | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.passwords.get(user) == password else None

    def _acting_as(self, envelope: etree._Element, caller: str) -> str | None:
        """The impersonated user, after checking the caller may impersonate them."""
        sid = envelope.find(f"{{{S}}}Header/{{{T}}}ExchangeImpersonation/{{{T}}}ConnectingSID")
        if sid is None:
            return None
        target = (sid.findtext(q(T, "PrimarySmtpAddress")) or "").strip().lower()
        if caller not in self.impersonators:
            raise Fault("ErrorImpersonateUserDenied",
                        "The account does not have permission to impersonate the requested "
                        "user.")
        if target not in self.mailboxes:
            raise Fault("ErrorNonExistentMailbox",
                        f"The SMTP address has no mailbox associated with it: {target}")
        return target

    def _mailbox_for(self, folder_id: etree._Element, caller: str, acting: str | None,
                     ) -> tuple[Mailbox, str]:
        """Resolve a FolderId/DistinguishedFolderId to (mailbox, folder) with access checks."""
        if etree.QName(folder_id).localname == "FolderId":
            address, _, folder = base64.b64decode(folder_id.get("Id", "")).decode().partition("/")
        else:
            folder = folder_id.get("Id", "")
            named = folder_id.findtext(f"{{{T}}}Mailbox/{{{T}}}EmailAddress")
            address = (named or acting or caller).strip().lower()
        if address not in self.mailboxes:
            raise ItemError("ErrorNonExistentMailbox",
                            f"The SMTP address has no mailbox associated with it: {address}")
        user = acting or caller
        if address != user and user not in self.delegates.get(address, set()):
            raise ItemError("ErrorAccessDenied",
                            f"{user} has no delegate access to {address}'s {folder} folder")
        if folder not in FOLDER_CLASSES:
            raise ItemError("ErrorFolderNotFound", f"no such folder: {folder}")
        return self.mailboxes[address], folder

    def _item(self, item_id: etree._Element, caller: str, acting: str | None,
              ) -> tuple[Mailbox, Item]:
        wanted = item_id.get("Id", "")
        user = acting or caller
        for box in self.mailboxes.values():
            if wanted in box.items:
                if box.address != user and user not in self.delegates.get(box.address, set()):
                    raise ItemError("ErrorAccessDenied", "access denied")
                return box, box.items[wanted]
        raise ItemError("ErrorItemNotFound", "The specified object was not found in the store.")

    def _target(self, item_id: etree._Element, caller: str, acting: str | None,
                ) -> tuple[Mailbox, Item, int | None]:
        """An ItemId, an occurrence's ItemId or an OccurrenceItemId → (mailbox, item or its
        recurring master, instance index or None)."""
        if etree.QName(item_id).localname == "OccurrenceItemId":
            master_id, index_text = item_id.get("RecurringMasterId", ""), item_id.get(
                "InstanceIndex", "")
        else:
            master_id, index_text = _occurrence_of(item_id.get("Id", "")) or (
                item_id.get("Id", ""), "")
        box, item = self._item(etree.Element(q(T, "ItemId"), Id=master_id), caller, acting)
        if not index_text:
            return box, item, None
        index = int(index_text)
        series = _Series.of(item)
        if series is None or index < 1 or series.original(index) is None:
            raise ItemError("ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange",
                            "Occurrence index is out of recurrence range.")
        if index in item.deleted:
            raise ItemError("ErrorCalendarOccurrenceIsDeletedFromRecurrence",
                            "Occurrence with this index was previously deleted from the "
                            "recurrence.")
        return box, item, index

    def _touch(self, box: Mailbox, item: Item) -> None:
        item.change += 1
        self._log(box, item.folder, "Update", item.id)

    def cancel_occurrence(self, address: str, master_id: str, index: int) -> None:
        """Delete one occurrence on the server side (a user in Outlook)."""
        with self._lock:
            box = self.mailboxes[address]
            item = box.items[master_id]
            item.exceptions.pop(index, None)
            item.deleted.add(index)
            self._touch(box, item)

    def _update_occurrence(self, box: Mailbox, item: Item, index: int,
                           updates: list[etree._Element]) -> None:
        series = _Series.of(item)
        assert series is not None
        current = item.exceptions.get(index)
        exception = _copy(current) if current is not None else series.occurrence(item, index)
        for update in updates:
            verb = etree.QName(update).localname
            if verb == "SetItemField":
                for child in update[-1]:
                    _replace_child(exception, child)
            elif verb == "DeleteItemField":
                name = _field_name(update)
                for child in list(exception):
                    if etree.QName(child).localname.lower() == name.lower():
                        exception.remove(child)
        moved = _time(exception.findtext(q(T, "Start")) or "")
        day = moved.astimezone(series.zone).date()
        for neighbour in (index - 1, index + 1):
            at = series.effective(item, neighbour)
            if at is None:
                continue
            near = at.astimezone(series.zone).date()
            if (neighbour < index and day <= near) or (neighbour > index and day >= near):
                raise ItemError("ErrorOccurrenceCrossingBoundary",
                                "Modified occurrence is crossing or overlapping adjacent "
                                "occurrence.")
        item.exceptions[index] = exception
        self._touch(box, item)

    # ------------------------------------------------------------ operations

    def op_GetFolder(self, op: etree._Element, caller: str, acting: str | None) -> etree._Element:
        response = _response("GetFolder")
        for folder_id in _kids(op.find(q(M, "FolderIds"))):
            try:
                box, folder = self._mailbox_for(folder_id, caller, acting)
            except ItemError as exc:
                _error_message(response, "GetFolder", exc)
                continue
            message = _message(response, "GetFolder")
            folders = etree.SubElement(message, q(M, "Folders"))
            tag, folder_class = FOLDER_CLASSES[folder]
            element = etree.SubElement(folders, q(T, tag))
            etree.SubElement(element, q(T, "FolderId"),
                             Id=base64.b64encode(f"{box.address}/{folder}".encode()).decode(),
                             ChangeKey="AQAAAA==")
            if folder_class:
                etree.SubElement(element, q(T, "FolderClass")).text = folder_class
            etree.SubElement(element, q(T, "DisplayName")).text = folder.capitalize()
            etree.SubElement(element, q(T, "TotalCount")).text = str(
                sum(1 for i in box.items.values() if i.folder == folder))
            etree.SubElement(element, q(T, "ChildFolderCount")).text = "0"
            if tag == "Folder":
                etree.SubElement(element, q(T, "UnreadCount")).text = "0"
        return response

    def op_SyncFolderItems(self, op: etree._Element, caller: str, acting: str | None,
                           ) -> etree._Element:
        response = _response("SyncFolderItems")
        folder_id = op.find(f"{{{M}}}SyncFolderId/*")
        assert folder_id is not None
        try:
            box, folder = self._mailbox_for(folder_id, caller, acting)
        except ItemError as exc:
            _error_message(response, "SyncFolderItems", exc)
            return response
        state_text = op.findtext(q(M, "SyncState"))
        if state_text:
            try:
                since = int(base64.b64decode(state_text).decode().rpartition(":")[2])
            except ValueError:
                _error_message(response, "SyncFolderItems", ItemError(
                    "ErrorInvalidSyncStateData",
                    "Synchronization state data is corrupt or otherwise invalid."))
                return response
        else:
            since = 0
        limit = int(op.findtext(q(M, "MaxChangesReturned")) or 512)
        wanted = {uri.get("FieldURI", "").partition(":")[2].lower()
                  for uri in op.iter(q(T, "FieldURI"))}
        pending = [entry for entry in box.log.get(folder, []) if entry[0] > since]
        if not state_text:
            # A first sync reports what is there now, not the history.
            pending = [(seq, "Create", i) for seq, change, i in pending
                       if change != "Delete" and i in box.items]
            seen: set[str] = set()
            pending = [p for p in pending if not (p[2] in seen or seen.add(p[2]))]
        page, rest = pending[:limit], pending[limit:]
        last = page[-1][0] if page else since
        message = _message(response, "SyncFolderItems")
        etree.SubElement(message, q(M, "SyncState")).text = base64.b64encode(
            f"{box.address}/{folder}:{last}".encode()).decode()
        etree.SubElement(message, q(M, "IncludesLastItemInRange")).text = (
            "false" if rest else "true")
        changes = etree.SubElement(message, q(M, "Changes"))
        for _seq, change, item_id in page:
            item = box.items.get(item_id)
            if change != "Delete" and item is None:
                continue  # created or changed, then deleted: the Delete entry follows
            element = etree.SubElement(changes, q(T, change))
            if change == "Delete":
                etree.SubElement(element, q(T, "ItemId"), Id=item_id)
            else:
                assert item is not None
                shown = etree.SubElement(element, q(T, item.kind))
                etree.SubElement(shown, q(T, "ItemId"), Id=item.id, ChangeKey=item.change_key)
                for child in _view(item):  # the ItemShape's AdditionalProperties
                    if etree.QName(child).localname.lower() in wanted:
                        shown.append(_copy(child))
        return response

    def op_GetItem(self, op: etree._Element, caller: str, acting: str | None) -> etree._Element:
        response = _response("GetItem")
        wants_mime = any(uri.get("FieldURI") == "item:MimeContent"
                         for uri in op.iter(q(T, "FieldURI")))
        for item_id in _kids(op.find(q(M, "ItemIds"))):
            try:
                _box, item, index = self._target(item_id, caller, acting)
            except ItemError as exc:
                _error_message(response, "GetItem", exc)
                continue
            message = _message(response, "GetItem")
            items = etree.SubElement(message, q(M, "Items"))
            items.append(_render(item, mime=wants_mime) if index is None
                         else _render_occurrence(item, index))
        return response

    def op_FindItem(self, op: etree._Element, caller: str, acting: str | None) -> etree._Element:
        response = _response("FindItem")
        folder_id = op.find(f"{{{M}}}ParentFolderIds/*")
        assert folder_id is not None
        try:
            box, folder = self._mailbox_for(folder_id, caller, acting)
        except ItemError as exc:
            _error_message(response, "FindItem", exc)
            return response
        found = [i for i in box.items.values() if i.folder == folder]
        restriction = op.find(q(M, "Restriction"))
        if restriction is not None:
            field_uri = restriction.find(f"{{{T}}}IsEqualTo/{{{T}}}FieldURI")
            constant = restriction.find(f"{{{T}}}IsEqualTo/{{{T}}}FieldURIOrConstant/"
                                        f"{{{T}}}Constant")
            if field_uri is None or constant is None or \
                    field_uri.get("FieldURI") != "message:InternetMessageId":
                raise Fault("ErrorInvalidOperation", "only IsEqualTo on "
                            "message:InternetMessageId is implemented by the fake")
            wanted = constant.get("Value")
            found = [i for i in found if i.element.findtext(q(T, "InternetMessageId")) == wanted]
        message = _message(response, "FindItem")
        root = etree.SubElement(message, q(M, "RootFolder"), TotalItemsInView=str(len(found)),
                                IncludesLastItemInRange="true")
        items = etree.SubElement(root, q(T, "Items"))
        for item in found:
            items.append(_render(item, mime=False))
        return response

    def op_CreateItem(self, op: etree._Element, caller: str, acting: str | None,
                      ) -> etree._Element:
        response = _response("CreateItem")
        disposition = op.get("MessageDisposition")
        saved = op.find(f"{{{M}}}SavedItemFolderId/*")
        for element in _kids(op.find(q(M, "Items"))):
            kind = etree.QName(element).localname
            try:
                if saved is not None:
                    box, folder = self._mailbox_for(saved, caller, acting)
                else:
                    address = acting or caller
                    if address not in self.mailboxes:
                        raise ItemError("ErrorNonExistentMailbox", f"no mailbox {address}")
                    box, folder = self.mailboxes[address], ITEM_FOLDER.get(kind, "inbox")
            except ItemError as exc:
                _error_message(response, "CreateItem", exc)
                continue
            message = _message(response, "CreateItem")
            items = etree.SubElement(message, q(M, "Items"))
            if kind == "Message":
                mime_text = element.findtext(q(T, "MimeContent")) or ""
                mime = base64.b64decode(mime_text)
                if self.max_message_bytes is not None and len(mime) > self.max_message_bytes:
                    message.getparent().remove(message)  # type: ignore[union-attr]
                    _error_message(response, "CreateItem", ItemError(
                        "ErrorMessageSizeExceeded",
                        "The message exceeds the maximum supported size."))
                    continue
                if disposition in ("SendOnly", "SendAndSaveCopy") and self._refused(mime):
                    message.getparent().remove(message)  # type: ignore[union-attr]
                    _error_message(response, "CreateItem", ItemError(
                        "ErrorInvalidRecipients", "The recipient collection on your message "
                        "or meeting request is invalid."))
                    continue
                if disposition in ("SendOnly", "SendAndSaveCopy"):
                    sender = acting or caller
                    if box.address != sender and sender not in self.delegates.get(
                            box.address, set()):
                        message.getparent().remove(message)  # type: ignore[union-attr]
                        _error_message(response, "CreateItem", ItemError(
                            "ErrorSendAsDenied",
                            "The user account which was used to submit this request does "
                            "not have the right to send mail on behalf of the specified "
                            "sending account."))
                        continue
                    self.sent.append((box.address, mime))
                if disposition == "SendOnly":
                    continue
                target_folder = "sentitems" if disposition == "SendAndSaveCopy" else folder
                stored = _strip(element, "MimeContent")
                header = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                    mime)
                if header["Message-ID"] and stored.find(q(T, "InternetMessageId")) is None:
                    # Exchange takes the item's InternetMessageId from the MIME header
                    etree.SubElement(stored, q(T, "InternetMessageId")).text = str(
                        header["Message-ID"]).strip()
                item = Item(self._new_id(), target_folder, stored, mime=mime)
                box.items[item.id] = item
                self._log(box, target_folder, "Create", item.id)
                if disposition == "SaveOnly":
                    _item_id(items, item)
                continue
            item = Item(self._new_id(), folder, _strip(element, "ItemId"))
            box.items[item.id] = item
            self._log(box, folder, "Create", item.id)
            _item_id(items, item)
        return response

    def _refused(self, mime: bytes) -> bool:
        """Whether the message names a recipient listed in `invalid_recipients`."""
        header = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(mime)
        listed = {a.lower() for _, a in email.utils.getaddresses(
            [str(v) for f in ("To", "Cc", "Bcc") for v in header.get_all(f) or []])}
        return bool(listed & self.invalid_recipients)

    def op_UpdateItem(self, op: etree._Element, caller: str, acting: str | None,
                      ) -> etree._Element:
        response = _response("UpdateItem")
        resolution = op.get("ConflictResolution", "AutoResolve")
        for change in _kids(op.find(q(M, "ItemChanges"))):
            item_id = change[0]  # ItemId or OccurrenceItemId (ItemChangeType)
            try:
                box, item, index = self._target(item_id, caller, acting)
                if (resolution == "NeverOverwrite" and item_id.get("ChangeKey")
                        and item_id.get("ChangeKey") != item.change_key):
                    raise ItemError("ErrorIrresolvableConflict",
                                    "The send or update operation could not be performed "
                                    "because the change key passed in the request does not "
                                    "match the current change key for the item.")
                if index is not None:
                    self._update_occurrence(box, item, index,
                                            _kids(change.find(q(T, "Updates"))))
            except ItemError as exc:
                _error_message(response, "UpdateItem", exc)
                continue
            if index is not None:
                message = _message(response, "UpdateItem")
                items = etree.SubElement(message, q(M, "Items"))
                shown = etree.SubElement(items, q(T, item.kind))
                etree.SubElement(shown, q(T, "ItemId"), Id=_occurrence_id(item.id, index),
                                 ChangeKey=item.change_key)
                conflicts = etree.SubElement(message, q(M, "ConflictResults"))
                etree.SubElement(conflicts, q(T, "Count")).text = "0"
                continue
            for update in _kids(change.find(q(T, "Updates"))):
                if _field_name(update) in _SERIES_FIELDS:
                    item.exceptions.clear()  # a new pattern: [MS-OXOCAL] 3.1.4.7.3.5
                    item.deleted.clear()
                verb = etree.QName(update).localname
                if verb == "SetItemField":
                    value = update[-1]  # the item element carrying the new value
                    for child in value:
                        _replace_child(item.element, child)
                elif verb == "DeleteItemField":
                    uri = update.find(q(T, "FieldURI"))
                    name = (uri.get("FieldURI", "") if uri is not None else "").partition(":")[2]
                    for child in list(item.element):
                        if etree.QName(child).localname.lower() == name.lower():
                            item.element.remove(child)
            item.change += 1
            self._log(box, item.folder, "Update", item.id)
            message = _message(response, "UpdateItem")
            items = etree.SubElement(message, q(M, "Items"))
            _item_id(items, item)
            conflicts = etree.SubElement(message, q(M, "ConflictResults"))
            etree.SubElement(conflicts, q(T, "Count")).text = "0"
        return response

    def op_DeleteItem(self, op: etree._Element, caller: str, acting: str | None,
                      ) -> etree._Element:
        response = _response("DeleteItem")
        for item_id in _kids(op.find(q(M, "ItemIds"))):
            try:
                box, item, index = self._target(item_id, caller, acting)
            except ItemError as exc:
                _error_message(response, "DeleteItem", exc)
                continue
            if index is not None:
                item.exceptions.pop(index, None)
                item.deleted.add(index)
                self._touch(box, item)
                _message(response, "DeleteItem")
                continue
            del box.items[item.id]
            self._log(box, item.folder, "Delete", item.id)
            _message(response, "DeleteItem")
        return response


# ---------------------------------------------------------------- XML helpers

def _envelope(response: etree._Element) -> bytes:
    envelope = etree.Element(q(S, "Envelope"), nsmap=NSMAP)
    header = etree.SubElement(envelope, q(S, "Header"))
    etree.SubElement(header, q(T, "ServerVersionInfo"), MajorVersion="15", MinorVersion="1",
                     MajorBuildNumber="2507", MinorBuildNumber="6", Version="V2017_07_11")
    etree.SubElement(envelope, q(S, "Body")).append(response)
    return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))


def _fault(fault: Fault) -> bytes:
    envelope = etree.Element(q(S, "Envelope"), nsmap=NSMAP)
    body = etree.SubElement(envelope, q(S, "Body"))
    element = etree.SubElement(body, q(S, "Fault"))
    code = etree.SubElement(element, "faultcode", nsmap={"a": E})
    code.text = f"a:{fault.code}"
    etree.SubElement(element, "faultstring").text = fault.message
    detail = etree.SubElement(element, "detail")
    etree.SubElement(detail, q(E, "ResponseCode"), nsmap={"e": E}).text = fault.code
    etree.SubElement(detail, q(E, "Message"), nsmap={"e": E}).text = fault.message
    if fault.backoff_ms is not None:
        xml = etree.SubElement(detail, q(T, "MessageXml"))
        etree.SubElement(xml, q(T, "Value"), Name="BackOffMilliseconds").text = str(
            fault.backoff_ms)
    return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))


def _response(operation: str) -> etree._Element:
    response = etree.Element(q(M, f"{operation}Response"), nsmap={"m": M, "t": T})
    etree.SubElement(response, q(M, "ResponseMessages"))
    return response


def _message(response: etree._Element, operation: str) -> etree._Element:
    messages = response.find(q(M, "ResponseMessages"))
    assert messages is not None
    message = etree.SubElement(messages, q(M, f"{operation}ResponseMessage"),
                               ResponseClass="Success")
    etree.SubElement(message, q(M, "ResponseCode")).text = "NoError"
    return message


def _error_message(response: etree._Element, operation: str, error: ItemError) -> None:
    messages = response.find(q(M, "ResponseMessages"))
    assert messages is not None
    message = etree.SubElement(messages, q(M, f"{operation}ResponseMessage"),
                               ResponseClass="Error")
    etree.SubElement(message, q(M, "MessageText")).text = error.message
    etree.SubElement(message, q(M, "ResponseCode")).text = error.code
    etree.SubElement(message, q(M, "DescriptiveLinkKey")).text = "0"
    if operation == "SyncFolderItems":
        # the documented error shape keeps both elements (SyncFolderItems operation page)
        etree.SubElement(message, q(M, "SyncState"))
        etree.SubElement(message, q(M, "IncludesLastItemInRange")).text = "true"


def _item_id(parent: etree._Element, item: Item) -> None:
    element = etree.SubElement(parent, q(T, item.kind))
    etree.SubElement(element, q(T, "ItemId"), Id=item.id, ChangeKey=item.change_key)


def _render(item: Item, *, mime: bool) -> etree._Element:
    element = etree.Element(q(T, item.kind))
    if mime and item.mime is not None:
        etree.SubElement(element, q(T, "MimeContent"), CharacterSet="UTF-8").text = (
            base64.b64encode(item.mime).decode())
    etree.SubElement(element, q(T, "ItemId"), Id=item.id, ChangeKey=item.change_key)
    for child in _view(item):
        element.append(child)
    return element


# ---------------------------------------------------------------- recurring calendar items

_SERIES_FIELDS = {"Recurrence", "Start", "End"}  # setting one makes a new pattern
_DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DAY_SETS = {"Day": _DAY_NAMES, "Weekday": _DAY_NAMES[:5], "WeekendDay": _DAY_NAMES[5:]}
_WEEK_INDEX = {"First": 1, "Second": 2, "Third": 3, "Fourth": 4, "Last": -1}
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_BOOLEANS = {"ReminderIsSet", "IsAllDayEvent", "IsResponseRequested", "AllowNewTimeProposal",
             "IsRecurring", "IsMeeting", "IsCancelled", "IsComplete", "IsRead", "IsDraft"}
_COMPUTED = {"CalendarItemType", "IsRecurring", "FirstOccurrence", "LastOccurrence",
             "ModifiedOccurrences", "DeletedOccurrences", "OriginalStart", "RecurrenceId"}


def _field_name(update: etree._Element) -> str:
    uri = update.find(q(T, "FieldURI"))
    return (uri.get("FieldURI", "") if uri is not None else "").partition(":")[2]


def _occurrence_id(master_id: str, index: int) -> str:
    return base64.b64encode(f"OCC:{master_id}:{index}".encode()).decode()


def _occurrence_of(item_id: str) -> tuple[str, str] | None:
    """(master id, index) of an occurrence's own ItemId, or None for any other id."""
    try:
        text = base64.b64decode(item_id).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not text.startswith("OCC:"):
        return None
    master, _, index = text[4:].rpartition(":")
    return master, index


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day_rule(day: int) -> dict[str, object]:
    """EWS DayOfMonth: "if for a particular month this value is larger than the number of
    days in the month, the last day of the month is assumed" (DayOfMonth reference page)."""
    if day <= 28:
        return {"bymonthday": day}
    return {"bymonthday": list(range(28, day + 1)), "bysetpos": -1}


def _weekdays(text: str) -> list[du.weekday]:
    names = _DAY_SETS.get(text.strip(), tuple(text.split()))
    return [du.weekdays[_DAY_NAMES.index(n)] for n in names]


class _Series:
    """A stored master's pattern expanded with dateutil, wall-clock times in its zone."""

    def __init__(self, element: etree._Element) -> None:
        recurrence = element.find(q(T, "Recurrence"))
        assert recurrence is not None
        zone_id = element.find(q(T, "StartTimeZone"))
        name = zone_id.get("Id", "UTC") if zone_id is not None else "UTC"
        self.zone = ZoneInfo(MS_TIMEZONE_TO_IANA_MAP.get(name, name))
        start = _time(element.findtext(q(T, "Start")) or "")
        self.duration = _time(element.findtext(q(T, "End")) or "") - start
        pattern, bounds = recurrence[0], recurrence[1]
        first = dt.date.fromisoformat((bounds.findtext(q(T, "StartDate")) or "")[:10])
        dtstart = dt.datetime.combine(first, start.astimezone(self.zone).time())
        kind = etree.QName(pattern).localname
        interval = int(pattern.findtext(q(T, "Interval")) or 1)
        args: dict[str, object] = {"dtstart": dtstart, "interval": interval}
        days = pattern.findtext(q(T, "DaysOfWeek")) or ""
        month = pattern.findtext(q(T, "Month"))
        if kind == "DailyRecurrence":
            freq = du.DAILY
        elif kind == "WeeklyRecurrence":
            freq = du.WEEKLY
            args["byweekday"] = _weekdays(days)
            args["wkst"] = _DAY_NAMES.index(pattern.findtext(q(T, "FirstDayOfWeek")) or
                                            "Sunday")
        elif kind in ("AbsoluteMonthlyRecurrence", "AbsoluteYearlyRecurrence"):
            freq = du.MONTHLY if kind.endswith("MonthlyRecurrence") else du.YEARLY
            args.update(_day_rule(int(pattern.findtext(q(T, "DayOfMonth")) or 1)))
        elif kind in ("RelativeMonthlyRecurrence", "RelativeYearlyRecurrence"):
            freq = du.MONTHLY if kind.endswith("MonthlyRecurrence") else du.YEARLY
            args["byweekday"] = _weekdays(days)
            args["bysetpos"] = _WEEK_INDEX[pattern.findtext(q(T, "DayOfWeekIndex")) or "First"]
        else:
            raise ItemError("ErrorInvalidRecurrence", f"{kind} is not a calendar pattern")
        if month is not None:
            args["bymonth"] = _MONTHS.index(month) + 1
        if etree.QName(bounds).localname == "NumberedRecurrence":
            args["count"] = int(bounds.findtext(q(T, "NumberOfOccurrences")) or 1)
        elif etree.QName(bounds).localname == "EndDateRecurrence":
            last = dt.date.fromisoformat((bounds.findtext(q(T, "EndDate")) or "")[:10])
            args["until"] = dt.datetime.combine(last, dt.time(23, 59, 59))
        self.bounded = "count" in args or "until" in args
        self.rule = du.rrule(freq, **args)  # type: ignore[arg-type]

    @classmethod
    def of(cls, item: Item) -> _Series | None:
        if item.kind != "CalendarItem" or item.element.find(q(T, "Recurrence")) is None:
            return None
        return cls(item.element)

    def original(self, index: int) -> dt.datetime | None:
        """The start of the ``index``-th (1-based) occurrence of the pattern, aware."""
        for position, local in enumerate(self.rule, start=1):
            if position == index:
                return local.replace(tzinfo=self.zone)
            if position >= min(index, 10000):
                break
        return None

    def last_index(self) -> int:
        return self.rule.count() if self.bounded else 0

    def effective(self, item: Item, index: int) -> dt.datetime | None:
        """Where occurrence ``index`` is now (a deleted one keeps its day for the crossing
        rule), or None outside the series."""
        if index < 1:
            return None
        if index in item.exceptions:
            return _time(item.exceptions[index].findtext(q(T, "Start")) or "")
        return self.original(index)

    def occurrence(self, item: Item, index: int) -> etree._Element:
        """Occurrence ``index`` as a plain (unmodified) calendar item."""
        start = self.original(index)
        assert start is not None
        element = etree.Element(q(T, "CalendarItem"))
        for child in item.element:
            name = etree.QName(child).localname
            if name in ("Recurrence", "Start", "End") or name in _COMPUTED:
                continue
            element.append(_copy(child))
        _set_child(element, "Start", _utc_text(start))
        _set_child(element, "End", _utc_text(start + self.duration))
        return element

    def entry(self, tag: str, item: Item, index: int) -> etree._Element:
        """A FirstOccurrence / LastOccurrence / ModifiedOccurrences' Occurrence element."""
        element = etree.Element(q(T, tag))
        original = self.original(index)
        assert original is not None
        shown = item.exceptions.get(index)
        start = _time(shown.findtext(q(T, "Start")) or "") if shown is not None else original
        end = _time(shown.findtext(q(T, "End")) or "") if shown is not None \
            else original + self.duration
        etree.SubElement(element, q(T, "ItemId"), Id=_occurrence_id(item.id, index),
                         ChangeKey=item.change_key)
        etree.SubElement(element, q(T, "Start")).text = _utc_text(start)
        etree.SubElement(element, q(T, "End")).text = _utc_text(end)
        etree.SubElement(element, q(T, "OriginalStart")).text = _utc_text(original)
        return element


def _view(item: Item) -> list[etree._Element]:
    """The item's children as GetItem shows them: calendar times in UTC, and for a recurring
    master the computed CalendarItemType, First/LastOccurrence, Modified/DeletedOccurrences."""
    out = [_copy(c) for c in item.element]
    for child in out:  # xs:boolean as Exchange writes it (exchangelib sends 1/0)
        if etree.QName(child).localname in _BOOLEANS and child.text in ("0", "1"):
            child.text = "true" if child.text == "1" else "false"
    if item.kind != "CalendarItem":
        return out
    for child in out:
        if etree.QName(child).localname in ("Start", "End") and child.text:
            child.text = _utc_text(_time(child.text))
    series = _Series.of(item)
    kind = etree.Element(q(T, "CalendarItemType"))
    kind.text = "Single" if series is None else "RecurringMaster"
    if series is None:
        return [*out, kind]
    live = [next((i for i, _ in enumerate(series.rule, start=1) if i not in item.deleted),
                 None)]
    computed = [etree.Element(q(T, "IsRecurring")), kind]
    computed[0].text = "true"
    after: list[etree._Element] = []
    if live[0] is not None:
        after.append(series.entry("FirstOccurrence", item, live[0]))
    last = series.last_index()
    while last in item.deleted:
        last -= 1
    if last >= 1:
        after.append(series.entry("LastOccurrence", item, last))
    if item.exceptions:
        modified = etree.Element(q(T, "ModifiedOccurrences"))
        for index in sorted(item.exceptions):
            modified.append(series.entry("Occurrence", item, index))
        after.append(modified)
    if item.deleted:
        deleted = etree.Element(q(T, "DeletedOccurrences"))
        for index in sorted(item.deleted):
            entry = etree.SubElement(deleted, q(T, "DeletedOccurrence"))
            original = series.original(index)
            assert original is not None
            etree.SubElement(entry, q(T, "Start")).text = _utc_text(original)
        after.append(deleted)
    position = next(i for i, c in enumerate(out) if etree.QName(c).localname == "Recurrence")
    return [*out[:position], *computed, out[position], *after, *out[position + 1:]]


def _render_occurrence(item: Item, index: int) -> etree._Element:
    """GetItem of one occurrence: an ``Occurrence`` or, once changed, an ``Exception``."""
    series = _Series.of(item)
    assert series is not None
    body = item.exceptions.get(index)
    exception = body is not None
    body = _copy(body) if body is not None else series.occurrence(item, index)
    element = etree.Element(q(T, "CalendarItem"))
    etree.SubElement(element, q(T, "ItemId"), Id=_occurrence_id(item.id, index),
                     ChangeKey=item.change_key)
    original = series.original(index)
    assert original is not None
    for child in body:
        if etree.QName(child).localname in ("Start", "End") and child.text:
            child.text = _utc_text(_time(child.text))
        element.append(child)
    etree.SubElement(element, q(T, "RecurrenceId")).text = _utc_text(original)
    etree.SubElement(element, q(T, "OriginalStart")).text = _utc_text(original)
    etree.SubElement(element, q(T, "CalendarItemType")).text = (
        "Exception" if exception else "Occurrence")
    return element


def _copy(element: etree._Element) -> etree._Element:
    return etree.fromstring(etree.tostring(element))


def _strip(element: etree._Element, *names: str) -> etree._Element:
    copy = _copy(element)
    for child in list(copy):
        if etree.QName(child).localname in names:
            copy.remove(child)
    return copy


def _replace_child(parent: etree._Element, new: etree._Element) -> None:
    for child in list(parent):
        if child.tag == new.tag:
            parent.replace(child, _copy(new))
            return
    parent.append(_copy(new))


def _set_child(parent: etree._Element, tag: str, value: str) -> None:
    new = etree.Element(q(T, tag))
    new.text = value
    _replace_child(parent, new)
