"""Email activities: the application's record of a tracked or outgoing message.

One email activity exists per message, however many tracked mailboxes received it (a user
and a queue on the same To line share it); `store` links it to every receiving mailbox.
Incoming mail is tracked into activities by `services.incoming`; outgoing activities are
created by the application in *Pending Send* and sent by `services.outgoing`. The status
values are the reference system's (Draft, Pending Send, Sending, Sent, Failed, Received,
Canceled).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class Direction(enum.StrEnum):
    INCOMING = "incoming"
    OUTGOING = "outgoing"


class EmailStatus(enum.StrEnum):
    DRAFT = "draft"
    PENDING_SEND = "pending-send"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    RECEIVED = "received"
    CANCELED = "canceled"


class CorrelationMethod(enum.StrEnum):
    """How an incoming message was tied to an earlier activity (reference order)."""

    NONE = "none"
    IN_REPLY_TO = "in-reply-to"
    TRACKING_TOKEN = "tracking-token"
    CONVERSATION = "conversation"
    SMART_MATCHING = "smart-matching"


class Role(enum.StrEnum):
    FROM = "from"
    TO = "to"
    CC = "cc"
    BCC = "bcc"
    REPLY_TO = "reply-to"


@dataclass(frozen=True, slots=True)
class Recipient:
    """One address on a message, resolved to a directory record when possible."""

    role: Role
    address: str
    name: str = ""
    party_kind: str | None = None  # core.model.PartyKind value, when resolved
    party_key: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file on a message. ``content`` is None when it was not kept (``notice`` says why)."""

    name: str
    content_type: str
    size: int
    content: bytes | None = None
    content_id: str | None = None
    notice: str = ""  # e.g. "larger than the 25 MB limit; not stored"


@dataclass(frozen=True, slots=True)
class Regarding:
    """The application record an activity is about (an account, a case, ...)."""

    kind: str
    key: str


@dataclass(frozen=True, slots=True)
class EmailActivity:
    direction: Direction
    status: EmailStatus
    subject: str
    sender: str  # address of From:
    recipients: tuple[Recipient, ...] = ()
    message_id: str | None = None  # with angle brackets, as in the header
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    conversation_id: str | None = None  # Thread-Index / X-Conversation-ID when present
    tracking_token: str | None = None
    sent_at: dt.datetime | None = None  # the Date: header
    received_at: dt.datetime | None = None
    body_text: str = ""
    body_html: str = ""  # sanitized (nh3)
    attachments: tuple[Attachment, ...] = ()
    owner_kind: str | None = None  # "user" or "queue"
    owner: str | None = None
    regarding: Regarding | None = None
    correlated_to: int | None = None  # id of the earlier activity this one correlates with
    correlation: CorrelationMethod = CorrelationMethod.NONE
    sender_mailbox: str | None = None  # outgoing: the mailbox that sends it
    content_hash: str | None = None  # sha256 of the raw message, when there is one
    notices: tuple[str, ...] = ()  # degraded parsing, dropped parts, ...
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    id: int | None = None

    def addresses(self, *roles: Role) -> list[str]:
        return [r.address for r in self.recipients if not roles or r.role in roles]
