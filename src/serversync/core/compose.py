"""Building the RFC 5322 message for an outgoing email activity (stdlib ``email``).

Follows RFC 5322 (headers, Message-ID, In-Reply-To/References §3.6.4), RFC 2045-2049 (MIME:
``multipart/alternative`` text + HTML, ``multipart/related`` for inline images,
``multipart/mixed`` for attachments), RFC 2047 (encoded display names and subject),
RFC 2231 (non-ASCII attachment file names), RFC 6531/6532 (SMTPUTF8: UTF-8 addresses and
headers, only when the server offers it) and RFC 5891 (IDNA for non-ASCII domains otherwise).

Two properties matter to the send pipeline:

* **Deterministic output.** The Message-ID and the Date are fixed before the first attempt
  and the MIME boundaries are derived from the Message-ID, so building the same activity
  again (a retry, or the Sent copy made after a crash) gives the same bytes.
* **Nothing silently dropped.** A recipient that cannot be reached without SMTPUTF8 (a
  non-ASCII local part) is returned in ``unreachable`` with the reason, for the per-recipient
  results; a sender that cannot be expressed raises `ComposeError`.

Pure: standard library only.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.errors
import email.header
import email.utils
import hashlib
import html.parser
import re
import urllib.parse
from dataclasses import dataclass

from serversync.core.email import Attachment, EmailActivity, Role
from serversync.core.errors import ItemError
from serversync.core.outgoing import Priority
from serversync.core.tokens import add_token

# Bodies travel 8bit when the server offers 8BITMIME (RFC 6152; SMTPUTF8 implies it), else
# base64. Headers are encoded with the stdlib's encoders (`email.utils.formataddr`,
# `email.header.Header`, RFC 2047) and the MIME structure is written directly as bytes:
# `EmailMessage` parsed and refolded every header and part header through its policy, which
# cost ~0.8 ms of CPU per message, the largest single cost of sending (docs/benchmarks.md);
# writing it here costs a tenth of that. The output is checked by parsing it back with the
# stdlib parser in tests/unit/test_outgoing_compose.py.
_MAX_LINE = 998  # RFC 5322 §2.1.1, in octets without CRLF
_NEWLINES = re.compile(r"\r\n|\r|\n")
_BAD_HEADER = re.compile(r"[\r\n\0]")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+$")  # RFC 2045 token, for type and subtype
_PARAM_SEGMENT = 50  # characters per RFC 2231 segment: a folded line stays under 78
USER_AGENT = "serversync"
_FOLD = 76


class ComposeError(ItemError):
    code = "compose-failed"


@dataclass(frozen=True, slots=True)
class Composed:
    """A built message and its SMTP envelope."""

    raw: bytes  # what is transmitted (no Bcc header)
    sent_copy: bytes  # what goes to the Sent folder (with Bcc, so the user sees it)
    recipients: tuple[str, ...]  # envelope RCPT TO, in order, without duplicates
    unreachable: dict[str, str]  # recipient -> why it cannot be sent to
    smtputf8: bool  # the message and envelope need the SMTPUTF8 extension
    message_id: str
    eightbit: bool = False  # 8-bit bodies: send with BODY=8BITMIME (RFC 6152)


def make_message_id(sender: str, unique: str) -> str:
    """``<unique@sender's domain>``: generated once, before the first attempt."""
    domain = sender.rpartition("@")[2] or "serversync.invalid"
    return f"<{unique}@{_idna(domain)}>"


def _idna(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ComposeError(f"domain {domain!r} cannot be encoded for DNS (IDNA): {exc}",
                           fix="correct the address") from None


def needs_smtputf8(address: str) -> bool:
    """A non-ASCII local part can only travel with SMTPUTF8 (domains have IDNA)."""
    return not address.rpartition("@")[0].isascii()


def envelope_address(address: str, smtputf8: bool) -> str:
    """The form of ``address`` for MAIL FROM / RCPT TO in this session."""
    if smtputf8:
        return address
    local, _, domain = address.rpartition("@")
    return f"{local}@{_idna(domain)}"


def _header_address(name: str, address: str, smtputf8: bool) -> str:
    """One mailbox for an address header: RFC 2047 display name, IDNA domain unless UTF-8."""
    local, _, domain = address.rpartition("@")
    spec = f"{local}@{domain if smtputf8 else _idna(domain)}"
    if not name:
        return spec
    if smtputf8:  # RFC 6532: UTF-8 in a quoted display name, the address as it is
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{spec}>'
    return email.utils.formataddr((name, spec), charset="utf-8")


def _address_list(mailboxes: list[str]) -> str:
    """Comma-separated, folded between mailboxes when the line would get long."""
    joined = ", ".join(mailboxes)
    return joined if len(joined) <= _FOLD else ",\r\n ".join(mailboxes)


def _text_header(name: str, value: str, smtputf8: bool) -> str:
    if smtputf8 or value.isascii():
        if len(value) + len(name) + 2 <= _FOLD:
            return value
    charset = "us-ascii" if value.isascii() else "utf-8"
    return email.header.Header(value, charset, header_name=name).encode(linesep="\r\n")


class _TextFromHtml(html.parser.HTMLParser):
    """Plain-text fallback for HTML-only email: text content, block elements as lines."""

    _BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                         "blockquote", "pre", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def text_from_html(markup: str) -> str:
    parser = _TextFromHtml()
    parser.feed(markup)
    parser.close()
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip() + "\n"


def _cte(text: str, eightbit: bool) -> str:
    """The transfer encoding for a text part, chosen without trial encodings.

    The stdlib's heuristic QP-encodes a sample of every non-ASCII body (pure Python) and
    falls back to it for lines over 78 characters; RFC 5322 allows 998.
    """
    data = text.encode("utf-8")
    if len(data) <= _MAX_LINE or max(map(len, data.splitlines())) <= _MAX_LINE:
        if data.isascii():
            return "7bit"
        if eightbit:
            return "8bit"
    return "base64"


def _text_part(text: str, subtype: str, eightbit: bool) -> bytes:
    """A text/* part in UTF-8 with CRLF line ends (RFC 2046 §4.1.1 canonical form)."""
    # CRLF: a plain replace when there is no CR (the usual case) costs a tenth of the regex
    text = _NEWLINES.sub("\r\n", text) if "\r" in text else text.replace("\n", "\r\n")
    if not text.endswith("\r\n"):
        text += "\r\n"
    cte = _cte(text, eightbit)
    data = text.encode("utf-8")
    if cte == "base64":
        data = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode("ascii") + data


def _filename(name: str) -> str:
    """The ``filename`` parameter: quoted when short ASCII, else RFC 2231 (continued)."""
    if not name:
        return ""
    if name.isascii() and name.isprintable() and len(name) <= _PARAM_SEGMENT:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f';\r\n filename="{quoted}"'
    encoded = urllib.parse.quote(name.encode("utf-8"), safe="!#$&+^`|")
    if len(encoded) <= _PARAM_SEGMENT:
        return f";\r\n filename*=utf-8''{encoded}"
    segments: list[str] = []
    while encoded:  # never split a %XX escape
        cut = _PARAM_SEGMENT
        while "%" in encoded[max(0, cut - 2):cut]:
            cut -= 1
        segments.append(encoded[:cut])
        encoded = encoded[cut:]
    charset = "utf-8''"
    return "".join(f";\r\n filename*{i}*={charset if i == 0 else ''}{segment}"
                   for i, segment in enumerate(segments))


def _file_part(att: Attachment, disposition: str, content_id: str | None,
               activity_id: int | None) -> bytes:
    """An attachment or inline part, base64 (RFC 2045 §6.8) with its file name."""
    if att.content is None:
        raise ComposeError(
            f"attachment {att.name!r} of email activity {activity_id} has no content "
            f"({att.notice or 'not stored'})", fix="attach the file again")
    maintype, _, subtype = att.content_type.partition("/")
    if maintype.lower() in ("multipart", "message") or not (
            _TOKEN.match(maintype) and _TOKEN.match(subtype)):
        # a container type cannot hold opaque bytes (and a malformed type is not sent)
        maintype, subtype = "application", "octet-stream"
    head = (f"Content-Type: {maintype}/{subtype}\r\n"
            f"Content-Disposition: {disposition}{_filename(att.name)}\r\n"
            "Content-Transfer-Encoding: base64\r\n")
    if content_id:
        if _BAD_HEADER.search(content_id):
            raise ComposeError(f"the Content-ID of {att.name!r} contains a line break")
        head += f"Content-ID: {content_id}\r\n"
    return (head + "\r\n").encode("utf-8") + base64.encodebytes(att.content).replace(
        b"\n", b"\r\n")


def _multipart(subtype: str, boundary: str, parts: list[bytes]) -> bytes:
    """multipart/* (RFC 2046 §5.1): each delimiter is CRLF ``--boundary``."""
    dash = b"--" + boundary.encode("ascii")
    return (f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n\r\n'
            .encode("ascii") + dash + b"\r\n" + (b"\r\n" + dash + b"\r\n").join(parts)
            + b"\r\n" + dash + b"--\r\n")


def _boundary(message_id: str, kind: str) -> str:
    """A boundary derived from the Message-ID: rebuilding gives identical bytes.

    The Message-ID is generated by us when the activity is created, so content supplied by
    the application cannot anticipate (and contain) a boundary line.
    """
    return f"=_ss_{kind}_{hashlib.sha256(f'{message_id}/{kind}'.encode()).hexdigest()[:32]}"


def compose(activity: EmailActivity, *, date: dt.datetime, smtputf8_offered: bool,
            eightbit_offered: bool = False, on_behalf_of: str | None = None,
            priority: Priority = Priority.NORMAL) -> Composed:
    """Build the message for ``activity`` as it will be submitted in this session.

    Raises `ComposeError` (never another exception) when the activity cannot be expressed.
    """
    try:
        return _compose(activity, date=date, smtputf8_offered=smtputf8_offered,
                        eightbit_offered=eightbit_offered, on_behalf_of=on_behalf_of,
                        priority=priority)
    except ComposeError:
        raise
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as exc:
        raise ComposeError(f"email activity {activity.id} cannot be built as a message "
                           f"({type(exc).__name__}: {exc})",
                           fix="correct the addresses, names or attachments") from exc


def _compose(activity: EmailActivity, *, date: dt.datetime, smtputf8_offered: bool,
             eightbit_offered: bool, on_behalf_of: str | None,
             priority: Priority) -> Composed:
    """`compose` without the error translation.

    ``on_behalf_of`` is the delegate's address when a delegate sends for the owner: it
    becomes the ``Sender:`` header (RFC 5322 §3.6.2) while ``From:`` stays the owner.
    """
    if activity.message_id is None:
        raise ComposeError(f"email activity {activity.id} has no Message-ID",
                           fix="create outgoing email through the outgoing service")
    addresses = [activity.sender, *activity.addresses(Role.TO, Role.CC, Role.BCC)]
    utf8 = smtputf8_offered and any(needs_smtputf8(a) for a in addresses)
    if needs_smtputf8(activity.sender) and not utf8:
        raise ComposeError(
            f"the sender address {activity.sender} needs SMTPUTF8, which the server does not "
            "offer", fix="enable SMTPUTF8 on the submission server, or use an ASCII address")

    unreachable: dict[str, str] = {}
    recipients: list[str] = []
    seen: set[str] = set()
    for recipient in activity.recipients:
        if recipient.role not in (Role.TO, Role.CC, Role.BCC):
            continue
        address = recipient.address
        if needs_smtputf8(address) and not utf8:
            unreachable[address] = ("the address needs SMTPUTF8 (RFC 6531), which the "
                                    "submission server does not offer")
            continue
        try:
            envelope = envelope_address(address, utf8)
        except ComposeError as exc:
            unreachable[address] = exc.message
            continue
        if envelope.lower() not in seen:
            seen.add(envelope.lower())
            recipients.append(envelope)

    message_id = activity.message_id
    headers: list[tuple[str, str]] = []
    sender_name = next((r.name for r in activity.recipients if r.role is Role.FROM), "")
    headers.append(("From", _header_address(sender_name, activity.sender, utf8)))
    if on_behalf_of and on_behalf_of.lower() != activity.sender.lower():
        headers.append(("Sender", _header_address("", on_behalf_of, utf8)))
    for role, header in ((Role.TO, "To"), (Role.CC, "Cc"), (Role.REPLY_TO, "Reply-To")):
        listed = [_header_address(r.name, r.address, utf8) for r in activity.recipients
                  if r.role is role and r.address not in unreachable]
        if listed:
            headers.append((header, _address_list(listed)))
    subject = activity.subject
    if activity.tracking_token:
        subject = add_token(subject, activity.tracking_token)
    headers.append(("Subject", _text_header("Subject", subject, utf8)))
    headers.append(("Date", email.utils.format_datetime(date.astimezone(dt.UTC))))
    headers.append(("Message-ID", message_id))
    if activity.in_reply_to:
        headers.append(("In-Reply-To", activity.in_reply_to))
        references = list(activity.references) or [activity.in_reply_to]
        headers.append(("References", "\r\n ".join(references)))
    if priority is Priority.HIGH:
        headers += [("X-Priority", "1 (Highest)"), ("Importance", "high")]
    elif priority is Priority.LOW:
        headers += [("X-Priority", "5 (Lowest)"), ("Importance", "low")]
    headers.append(("User-Agent", USER_AGENT))
    for name, value in headers:
        if _BAD_HEADER.search(value.replace("\r\n ", "")):
            raise ComposeError(f"the {name} header of email activity {activity.id} contains "
                               "a line break", fix="remove line breaks from names and subject")

    text = activity.body_text
    if not text and activity.body_html:
        text = text_from_html(activity.body_html)
    eightbit = utf8 or eightbit_offered
    body = _text_part(text or "\n", "plain", eightbit)
    inline = [a for a in activity.attachments if a.content_id and activity.body_html]
    files = [a for a in activity.attachments if a not in inline]
    if activity.body_html:
        html_part = _text_part(activity.body_html, "html", eightbit)
        if inline:
            html_part = _multipart("related", _boundary(message_id, "rel"), [html_part, *(
                _file_part(a, "inline", f"<{a.content_id.strip('<>')}>" if a.content_id
                           else None, activity.id) for a in inline)])
        body = _multipart("alternative", _boundary(message_id, "alt"), [body, html_part])
    if files:
        body = _multipart("mixed", _boundary(message_id, "mix"),
                          [body, *(_file_part(a, "attachment", None, activity.id)
                                   for a in files)])
    head = "".join(f"{name}: {value}\r\n" for name, value in headers) + "MIME-Version: 1.0\r\n"
    raw = head.encode("utf-8") + body

    bcc = [_header_address(r.name, r.address, utf8) for r in activity.recipients
           if r.role is Role.BCC and r.address not in unreachable]
    sent_copy = raw
    if bcc:
        sent_copy = b"Bcc: " + _address_list(bcc).encode("utf-8") + b"\r\n" + raw
    return Composed(raw, sent_copy, tuple(recipients), unreachable, utf8, message_id,
                    eightbit=not raw.isascii())
