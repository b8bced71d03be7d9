"""Raw RFC 5322 / MIME messages into the fields of an email activity.

Two parsers, one result. The fast path is fast-mail-parser (Rust ``mailparse`` through
pyo3; ~20k msg/s per core here, against ~1.7k for ``email.policy.default``, see
shared/reference/peer-bench.md §4.2); ``parse_batch`` hands a whole batch to its
``parse_many``, which releases the GIL and uses every core. Whatever it refuses goes to
the standard library's ``email`` package with the lenient ``compat32`` policy, which parses
anything that has a header block. Only when both fail does a message become an
`ItemError` — and the caller quarantines it with its raw bytes.

Degrading, never dropping: undecodable text is decoded with replacement characters and
its original bytes kept as an attachment; an attachment over the size limit is recorded
(name, type, size) with a notice instead of its content; every repair is a notice on the
activity. HTML bodies are sanitized with nh3 (ammonia) before they are stored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import email.header
import email.message
import email.policy
import email.utils
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser, BytesParser

import fast_mail_parser as fmp
import nh3

from serversync.core.email import Attachment, Recipient, Role
from serversync.core.errors import ItemError

_MSGID = re.compile(r"<[^<>\s]+>")
_COMPAT = BytesParser(policy=email.policy.compat32)
_HEADERS = BytesHeaderParser(policy=email.policy.compat32)
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Everything an activity takes from a message; no decisions yet."""

    subject: str
    sender: str
    recipients: tuple[Recipient, ...]
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    conversation_id: str | None
    sent_at: dt.datetime | None
    body_text: str
    body_html: str
    attachments: tuple[Attachment, ...]
    content_hash: str
    auto_submitted: bool = False  # RFC 3834 auto-replies, bounces, list traffic
    notices: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------- header helpers

def _first_id(values: Sequence[str]) -> str | None:
    for value in values:
        match = _MSGID.search(value)
        if match:
            return match.group(0)
    return None


def _all_ids(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for v in values for m in _MSGID.findall(v)))


def conversation_id(headers: dict[str, list[str]]) -> str | None:
    """The conversation a message belongs to, from the headers mail clients set.

    Outlook's ``Thread-Index`` is base64: its first 22 bytes identify the conversation
    root and stay the same in every reply (the rest grows by 5 bytes per reply).
    """
    for value in headers.get("thread-index", []):
        try:
            root = base64.b64decode(value.strip() + "==", validate=False)[:22]
        except (binascii.Error, ValueError):
            continue
        if len(root) == 22:
            return "thread-index:" + root.hex()
    for name in ("x-conversation-id", "conversation-id"):
        for value in headers.get(name, []):
            if value.strip():
                return value.strip()[:255]
    return None


def _is_auto(headers: dict[str, list[str]]) -> bool:
    auto = " ".join(headers.get("auto-submitted", [])).strip().lower()
    precedence = " ".join(headers.get("precedence", [])).strip().lower()
    return (bool(auto) and auto != "no") or precedence in ("bulk", "junk", "list")


def sanitize_html(html: str) -> str:
    return nh3.clean(html) if html else ""


def _attachment(name: str, content_type: str, content: bytes, content_id: str | None,
                limit: int) -> Attachment:
    size = len(content)
    if size > limit:
        return Attachment(name, content_type, size, None, content_id,
                          f"larger than the {limit / MB:g} MB attachment limit; not stored")
    return Attachment(name, content_type, size, content, content_id)


def _build(headers: dict[str, list[str]], *, subject: str, sender: tuple[str, str] | None,
           recipients: list[Recipient], sent_at: dt.datetime | None, texts: list[str],
           htmls: list[str], attachments: list[Attachment], raw: bytes,
           notices: list[str]) -> ParsedMessage:
    if sender is None:
        notices.append("no usable From: address")
    if not headers.get("message-id"):
        notices.append("no Message-ID header")
    return ParsedMessage(
        subject=subject.replace("\x00", ""),
        sender=(sender[1] if sender else "").lower(),
        recipients=tuple(recipients),
        message_id=_first_id(headers.get("message-id", [])),
        in_reply_to=_first_id(headers.get("in-reply-to", [])),
        references=_all_ids(headers.get("references", [])),
        conversation_id=conversation_id(headers),
        sent_at=sent_at,
        body_text="\n\n".join(t for t in texts if t).replace("\x00", ""),
        body_html=sanitize_html("\n".join(h for h in htmls if h).replace("\x00", "")),
        attachments=tuple(attachments),
        content_hash=hashlib.sha256(raw).hexdigest(),
        auto_submitted=_is_auto(headers),
        notices=tuple(notices))


# ---------------------------------------------------------------- fast path

def _from_fmp(mail: fmp.PyMail, raw: bytes, limit: int) -> ParsedMessage:
    headers: dict[str, list[str]] = {}
    for name, values in mail.headers.items():
        headers.setdefault(name.lower(), []).extend(values)
    notices = [f"{w.kind}: {w.detail}" for w in mail.warnings]
    recipients: list[Recipient] = []
    sender = None
    if mail.from_ is not None and mail.from_.address:
        sender = (mail.from_.display_name or "", mail.from_.address)
        recipients.append(Recipient(Role.FROM, sender[1].lower(), sender[0]))
    for role, addresses in ((Role.TO, mail.to), (Role.CC, mail.cc), (Role.BCC, mail.bcc),
                            (Role.REPLY_TO, mail.reply_to)):
        recipients.extend(Recipient(role, a.address.lower(), a.display_name or "")
                          for a in addresses if a.address)
    attachments = [_attachment(a.filename, a.mimetype or "application/octet-stream",
                               a.content, a.content_id, limit) for a in mail.attachments]
    if mail.date and mail.date_parsed is None:
        notices.append(f"unreadable Date: {mail.date[:80]!r}")
    return _build(headers, subject=mail.subject, sender=sender, recipients=recipients,
                  sent_at=mail.date_parsed, texts=list(mail.text_plain),
                  htmls=list(mail.text_html), attachments=attachments, raw=raw,
                  notices=notices)


# ---------------------------------------------------------------- robust fallback

def _text(value: object) -> str:
    """A header value as text: RFC 2047 decoded, raw 8-bit bytes read as UTF-8 (or Latin-1)."""
    if isinstance(value, email.header.Header):
        value = str(value)
    text = str(value) if value is not None else ""
    if any("\udc80" <= c <= "\udcff" for c in text):  # surrogateescape'd 8-bit bytes
        data = text.encode("utf-8", "surrogateescape")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return text


def _decode(payload: bytes, charset: str | None, notices: list[str], where: str,
            kept: list[Attachment], limit: int) -> str:
    name = (charset or "us-ascii").strip().strip('"') or "us-ascii"
    try:
        return payload.decode(name)
    except LookupError:
        notices.append(f"{where}: unknown charset {name[:40]!r}; decoded as UTF-8 with "
                       "replacements, original bytes kept as an attachment")
    except UnicodeDecodeError:
        notices.append(f"{where}: bytes invalid in {name[:40]!r}; decoded with replacements, "
                       "original bytes kept as an attachment")
    kept.append(_attachment(f"{where}.bin", "application/octet-stream", payload, None, limit))
    return payload.decode("utf-8", "replace")


def _addresses(msg: email.message.Message, name: str) -> list[tuple[str, str]]:
    values = [_text(v) for v in msg.get_all(name, [])]
    try:
        pairs = email.utils.getaddresses(values)
    except (ValueError, IndexError, TypeError):
        return []
    return [(n, a) for n, a in pairs if "@" in a]


def parse_stdlib(raw: bytes, limit: int) -> ParsedMessage:
    """The robust path: the standard library's compat32 parser, which accepts anything."""
    msg = _COMPAT.parsebytes(raw)
    notices = [f"MIME defect: {type(d).__name__}" for d in msg.defects[:10]]
    headers: dict[str, list[str]] = {}
    for key, value in msg.items():
        headers.setdefault(key.lower(), []).append(_text(value))
    recipients: list[Recipient] = []
    senders = _addresses(msg, "from")
    sender = (senders[0][0], senders[0][1]) if senders else None
    if sender:
        recipients.append(Recipient(Role.FROM, sender[1].lower(), sender[0]))
    for role, name in ((Role.TO, "to"), (Role.CC, "cc"), (Role.BCC, "bcc"),
                       (Role.REPLY_TO, "reply-to")):
        recipients.extend(Recipient(role, a.lower(), n) for n, a in _addresses(msg, name))
    sent_at = None
    if headers.get("date"):
        try:
            sent_at = email.utils.parsedate_to_datetime(headers["date"][0])
            if sent_at.tzinfo is None:
                sent_at = sent_at.replace(tzinfo=dt.UTC)
        except (TypeError, ValueError, IndexError):
            notices.append(f"unreadable Date: {headers['date'][0][:80]!r}")
    texts: list[str] = []
    htmls: list[str] = []
    attachments: list[Attachment] = []
    for i, part in enumerate(_leaves(msg)):
        ctype = part.get_content_type()
        disposition = (part.get("content-disposition") or "").split(";")[0].strip().lower()
        filename = _text(part.get_filename() or "")
        payload = part.get_payload(decode=True)
        if isinstance(part.get_payload(), list):  # message/rfc822 whose body is a message
            payload = part.as_bytes() if payload is None else payload
        data = payload if isinstance(payload, bytes) else b""
        if part.defects:
            notices.extend(f"part {i}: {type(d).__name__}" for d in part.defects[:5])
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            text = _decode(data, part.get_content_charset(), notices, f"part-{i}", attachments,
                           limit)
            (texts if ctype == "text/plain" else htmls).append(text)
        else:
            cid = part.get("content-id")
            attachments.append(_attachment(filename, ctype, data,
                                           _text(cid).strip("<> ") if cid else None, limit))
    subject = _text(msg.get("subject", ""))
    return _build(headers, subject=subject, sender=sender, recipients=recipients,
                  sent_at=sent_at, texts=texts, htmls=htmls, attachments=attachments, raw=raw,
                  notices=notices)


def _leaves(msg: email.message.Message) -> Iterable[email.message.Message]:
    """Leaf parts; an attached message/rfc822 is one leaf (kept whole as an attachment)."""
    if msg.get_content_maintype() == "message" and isinstance(msg.get_payload(), list):
        yield msg
        return
    if msg.is_multipart():
        for part in msg.get_payload():
            if isinstance(part, email.message.Message):
                yield from _leaves(part)
        return
    yield msg


# ---------------------------------------------------------------- entry points

def parse(raw: bytes, *, max_attachment_bytes: int = 25 * MB) -> ParsedMessage:
    """Parse one message; raise `ItemError` only when neither parser can read it."""
    try:
        return _from_fmp(fmp.parse_email(raw), raw, max_attachment_bytes)
    except (fmp.ParseError, ValueError, UnicodeError) as exc:
        first = f"fast parser refused it ({type(exc).__name__}: {str(exc)[:120]})"
    return _fallback(raw, max_attachment_bytes, first)


def _fallback(raw: bytes, limit: int, why: str) -> ParsedMessage:
    try:
        parsed = parse_stdlib(raw, limit)
    except Exception as exc:  # the last line of defence: any failure quarantines the item
        raise ItemError(f"message cannot be parsed: {why}; stdlib: {type(exc).__name__}: "
                        f"{str(exc)[:200]}", code="unparseable",
                        fix="the raw message is kept in quarantine; inspect it") from exc
    return dataclasses.replace(parsed, notices=(why, *parsed.notices))


@dataclass(frozen=True, slots=True)
class Headline:
    """The few headers an administrator recognises a message by (a quarantined one too)."""

    subject: str = ""
    sender: str = ""
    to: str = ""
    date: str = ""
    message_id: str | None = None


def headline(raw: bytes) -> Headline:
    """The header block only, decoded for display; never raises (the message may be why
    it is in quarantine), and empty fields for what cannot be read."""
    try:
        msg = _HEADERS.parsebytes(raw)

        def first(name: str) -> str:
            return " ".join(_text(msg.get(name, "")).split())[:998]
        return Headline(first("subject"), first("from"), first("to"), first("date"),
                        _first_id([_text(v) for v in msg.get_all("message-id", [])]))
    except Exception:  # any header block we cannot read: show nothing rather than fail
        return Headline()


def parse_batch(raws: Sequence[bytes], *, max_attachment_bytes: int = 25 * MB,
                threads: int | None = None) -> list[ParsedMessage | ItemError]:
    """Parse many messages at once, in order; a failure is returned in its slot, not raised.

    fast-mail-parser's ``parse_many`` parses the batch on ``threads`` native threads
    without the GIL; conversion to `ParsedMessage` is Python. Run this in a worker thread
    (``asyncio.to_thread``) so the event loop keeps reading the next batch meanwhile.
    """
    out: list[ParsedMessage | ItemError] = []
    results = fmp.parse_many(list(raws), threads=threads)
    for raw, result in zip(raws, results, strict=True):
        try:
            if isinstance(result, fmp.ParseError):
                out.append(_fallback(raw, max_attachment_bytes,
                                     f"fast parser refused it ({type(result).__name__})"))
            else:
                out.append(_from_fmp(result, raw, max_attachment_bytes))
        except ItemError as exc:
            out.append(exc)
        except (ValueError, UnicodeError, TypeError) as exc:
            try:
                out.append(_fallback(raw, max_attachment_bytes,
                                     f"fast path failed ({type(exc).__name__})"))
            except ItemError as inner:
                out.append(inner)
    return out
