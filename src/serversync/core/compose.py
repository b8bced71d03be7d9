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

import datetime as dt
import email.policy
import email.utils
import hashlib
import html.parser
import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage

from serversync.core.email import EmailActivity, Role
from serversync.core.errors import ItemError
from serversync.core.outgoing import Priority
from serversync.core.tokens import add_token

# 7bit transfer encodings for bodies (quoted-printable/base64) keep every hop happy;
# SMTPUTF8 sessions may carry UTF-8 headers, and 8BITMIME is implied there (RFC 6531 §3.1).
_POLICY_ASCII = email.policy.SMTP.clone(cte_type="7bit")
_POLICY_UTF8 = email.policy.SMTPUTF8
USER_AGENT = "serversync"


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


def _header_address(name: str, address: str, smtputf8: bool) -> Address:
    local, _, domain = address.rpartition("@")
    return Address(display_name=name, username=local,
                   domain=domain if smtputf8 else _idna(domain))


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


def _boundaries(message: EmailMessage, message_id: str) -> None:
    """Boundaries derived from the Message-ID: rebuilding gives identical bytes.

    The Message-ID is generated by us when the activity is created, so content supplied by
    the application cannot anticipate (and contain) a boundary line.
    """
    for index, part in enumerate(message.walk()):
        if part.is_multipart():
            digest = hashlib.sha256(f"{message_id}/{index}".encode()).hexdigest()[:32]
            part.set_boundary(f"=_ss{index}_{digest}")


def compose(activity: EmailActivity, *, date: dt.datetime, smtputf8_offered: bool,
            on_behalf_of: str | None = None, priority: Priority = Priority.NORMAL,
            ) -> Composed:
    """Build the message for ``activity`` as it will be submitted in this session.

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

    policy = _POLICY_UTF8 if utf8 else _POLICY_ASCII
    msg = EmailMessage(policy=policy)
    sender_name = next((r.name for r in activity.recipients if r.role is Role.FROM), "")
    msg["From"] = _header_address(sender_name, activity.sender, utf8)
    if on_behalf_of and on_behalf_of.lower() != activity.sender.lower():
        msg["Sender"] = _header_address("", on_behalf_of, utf8)
    for role, header in ((Role.TO, "To"), (Role.CC, "Cc"), (Role.REPLY_TO, "Reply-To")):
        listed = [_header_address(r.name, r.address, utf8) for r in activity.recipients
                  if r.role is role and r.address not in unreachable]
        if listed:
            msg[header] = listed
    subject = activity.subject
    if activity.tracking_token:
        subject = add_token(subject, activity.tracking_token)
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(date.astimezone(dt.UTC))
    msg["Message-ID"] = activity.message_id
    if activity.in_reply_to:
        msg["In-Reply-To"] = activity.in_reply_to
        references = list(activity.references) or [activity.in_reply_to]
        msg["References"] = " ".join(references)
    if priority is Priority.HIGH:
        msg["X-Priority"] = "1 (Highest)"
        msg["Importance"] = "high"
    elif priority is Priority.LOW:
        msg["X-Priority"] = "5 (Lowest)"
        msg["Importance"] = "low"
    msg["User-Agent"] = USER_AGENT

    text = activity.body_text
    if not text and activity.body_html:
        text = text_from_html(activity.body_html)
    msg.set_content(text or "\n")
    inline = [a for a in activity.attachments if a.content_id and activity.body_html]
    files = [a for a in activity.attachments if a not in inline]
    if activity.body_html:
        msg.add_alternative(activity.body_html, subtype="html")
        html_part = msg.get_body(("html",))
        assert isinstance(html_part, EmailMessage)
        for att in inline:
            maintype, _, subtype = att.content_type.partition("/")
            html_part.add_related(att.content or b"", maintype=maintype,
                                  subtype=subtype or "octet-stream", filename=att.name,
                                  disposition="inline", cid=f"<{att.content_id.strip('<>')}>"
                                  if att.content_id else None)
    for att in files:
        if att.content is None:
            raise ComposeError(
                f"attachment {att.name!r} of email activity {activity.id} has no content "
                f"({att.notice or 'not stored'})", fix="attach the file again")
        maintype, _, subtype = att.content_type.partition("/")
        if maintype in ("multipart", "message") or not subtype:
            # a container type cannot hold opaque bytes: send it as a plain file
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(att.content, maintype=maintype, subtype=subtype, filename=att.name)
    _boundaries(msg, activity.message_id)
    raw = msg.as_bytes(policy=policy)

    bcc = [_header_address(r.name, r.address, utf8) for r in activity.recipients
           if r.role is Role.BCC and r.address not in unreachable]
    sent_copy = raw
    if bcc:
        bcc_msg = EmailMessage(policy=policy)
        bcc_msg["Bcc"] = bcc
        sent_copy = bcc_msg.as_bytes(policy=policy).split(b"\r\n\r\n", 1)[0] + b"\r\n" + raw
    return Composed(raw, sent_copy, tuple(recipients), unreachable, utf8, activity.message_id)
