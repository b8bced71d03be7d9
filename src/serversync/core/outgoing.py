"""The send lifecycle of an outgoing email activity: states, results, retry timing.

Reference behaviour (``dynamics-sss.md`` §3.7): the application sets an email to *Pending
Send*; the sender mailbox's outgoing channel picks it up (honouring *Send Later* and the
delivery priority), marks it *Sending*, submits it, and records *Sent* or *Failed*, counting
delivery attempts. Transient errors ("the system will try to send the message again later")
retry; the reference retries 10 times, and so do we, with exponential backoff.

The send pipeline journals its progress in a `Phase` per email so that a crash at any point
can be recovered without sending anything twice (the mechanism is described in
`serversync.services.outgoing`):

* ``queued``      waiting in Pending Send;
* ``claimed``     taken by a run (status Sending) but not yet handed to the server: safe to
                  put back;
* ``submitting``  durably marked just before SMTP DATA: from here on the server may have the
                  message, so it is never resent without proof that it was not accepted;
* ``done``        finished (Sent, Failed or Canceled).

Pure: no I/O, standard library only.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from serversync.core.email import EmailStatus

MAX_ATTEMPTS = 10  # the reference retries transient failures 10 times
BACKOFF_BASE = dt.timedelta(minutes=1)
BACKOFF_CAP = dt.timedelta(hours=1)
# How long a run may hold claimed emails before another run treats it as crashed.
LEASE = dt.timedelta(minutes=10)


class Priority(enum.IntEnum):
    """The reference's ``deliveryprioritycode``: higher is sent first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


class Phase(enum.StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    SUBMITTING = "submitting"
    DONE = "done"


class CopyState(enum.StrEnum):
    """The copy in the mailbox's Sent folder."""

    OFF = "off"  # not wanted (save_to_sent is off)
    PENDING = "pending"  # wanted, not made yet (made after the server accepted the message)
    DONE = "done"
    FAILED = "failed"  # the folder refused it; the notice says why


class RecipientStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # 5xx, or unreachable (e.g. needs SMTPUTF8 the server lacks)
    DEFERRED = "deferred"  # 4xx while others were accepted: not delivered by this attempt


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the server said about one envelope recipient."""

    address: str
    status: RecipientStatus
    code: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class SendState:
    """Everything the application may show about an outgoing email's delivery."""

    email_id: int
    status: EmailStatus
    mailbox: str
    priority: Priority
    message_id: str
    send_after: dt.datetime | None
    next_attempt_at: dt.datetime | None
    attempts: int
    phase: Phase
    last_error: str | None
    last_error_code: str | None
    recipients: tuple[RecipientResult, ...]
    sent_copy: CopyState
    accepted_at: dt.datetime | None
    smtp_reply: str | None

    @property
    def rejected(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if r.status is not RecipientStatus.ACCEPTED)


def backoff(attempts: int, retry_after: float | None = None) -> dt.timedelta:
    """Delay before the next attempt after ``attempts`` failed ones: 1, 2, 4 … 60 minutes.

    A server's own hint (``retry_after``) wins when it asks for longer.
    """
    exponent = max(0, min(attempts - 1, 12))
    delay: dt.timedelta = min(BACKOFF_BASE * (2 ** exponent), BACKOFF_CAP)
    if retry_after is not None and retry_after > delay.total_seconds():
        delay = dt.timedelta(seconds=min(retry_after, BACKOFF_CAP.total_seconds() * 24))
    return delay


def due_at(created: dt.datetime, send_after: dt.datetime | None,
           next_attempt_at: dt.datetime | None) -> dt.datetime:
    """The earliest time an email may be sent: after Send Later and after its backoff."""
    return max(t for t in (created, send_after, next_attempt_at) if t is not None)
