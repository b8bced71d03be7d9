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

**Deferred recipients.** A server may accept some recipients and answer others with a
temporary 4xx at RCPT TO (greylisting, a full mailbox, 452 "too many recipients"). The email
is then *Sent* — it went out — but those recipients are `RecipientStatus.DEFERRED`, each with
its own attempts and next attempt: later runs submit the same message to them alone
(a *follow-up*, journaled through the same phases), with the same `backoff` and
`MAX_ATTEMPTS` as whole-message retries, until they are accepted, refused (5xx) or given up
(`RecipientStatus.FAILED`). The functions below are the bookkeeping of that.

Pure: no I/O, standard library only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Sequence
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
    DEFERRED = "deferred"  # 4xx: not delivered yet; retried at ``next_attempt_at``
    FAILED = "failed"  # deferred until given up, or a follow-up's outcome is unknown


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the server said about one envelope recipient.

    ``attempts`` counts the submissions that included this recipient (towards
    `MAX_ATTEMPTS`); ``next_attempt_at`` is set while it is `RecipientStatus.DEFERRED`.
    """

    address: str
    status: RecipientStatus
    code: int = 0
    message: str = ""
    attempts: int = 0
    next_attempt_at: dt.datetime | None = None


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
        """Every recipient not (yet) accepted: rejected, deferred or failed."""
        return tuple(r for r in self.recipients if r.status is not RecipientStatus.ACCEPTED)

    @property
    def deferred(self) -> tuple[RecipientResult, ...]:
        """Recipients a later run still submits the message to."""
        return tuple(r for r in self.recipients if r.status is RecipientStatus.DEFERRED)


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


# ---------------------------------------------------------------- deferred recipients


def too_many_recipients(code: int, message: str) -> bool:
    """452 "too many recipients" (RFC 5321 4.5.3.1.10, enhanced code 4.5.3, RFC 3463).

    Not a verdict on the recipient: the server only wants it in another transaction.
    """
    return code == 452 and (message.lstrip().startswith("4.5.3")
                            or "too many recipients" in message.lower())


def settle(result: RecipientResult, attempts: int, now: dt.datetime, *,
           progressed: bool) -> RecipientResult:
    """One recipient's result of a submission that included it, for the record.

    ``attempts`` counts that submission. A deferred recipient is retried after `backoff`
    like a whole message, and becomes `RecipientStatus.FAILED` once ``attempts`` reaches
    `MAX_ATTEMPTS`. A 452 "too many recipients" in a transaction that delivered to others
    (``progressed``) is not counted and is due at once: the next transaction takes the
    recipients the server had no room for. Without progress it counts like any 4xx, so a
    server that always answers 452 cannot keep an email retrying for ever.
    """
    if result.status is not RecipientStatus.DEFERRED:
        return dataclasses.replace(result, attempts=attempts, next_attempt_at=None)
    if progressed and too_many_recipients(result.code, result.message):
        return dataclasses.replace(result, attempts=max(0, attempts - 1), next_attempt_at=now)
    if attempts >= MAX_ATTEMPTS:
        reply = f"{result.code} {result.message}".strip() if result.code else result.message
        return dataclasses.replace(
            result, status=RecipientStatus.FAILED, attempts=attempts, next_attempt_at=None,
            message=f"gave up after {attempts} attempts; last reply: {reply}")
    return dataclasses.replace(result, attempts=attempts,
                               next_attempt_at=now + backoff(attempts))


def merge(previous: Sequence[RecipientResult],
          updates: Sequence[RecipientResult]) -> tuple[RecipientResult, ...]:
    """The email's per-recipient results after a follow-up: updated ones replaced in place."""
    by_address = {r.address: r for r in updates}
    merged = [by_address.pop(r.address, r) for r in previous]
    return (*merged, *by_address.values())


def deferred_due(results: Sequence[RecipientResult]) -> dt.datetime | None:
    """When the next follow-up is due: the earliest deferred recipient's next attempt."""
    times = [r.next_attempt_at for r in results
             if r.status is RecipientStatus.DEFERRED and r.next_attempt_at is not None]
    return min(times) if times else None


def due_recipients(results: Sequence[RecipientResult], now: dt.datetime) -> tuple[str, ...]:
    """The deferred recipients a follow-up starting at ``now`` submits to, in order."""
    return tuple(r.address for r in results if r.status is RecipientStatus.DEFERRED
                 and (r.next_attempt_at is None or r.next_attempt_at <= now))


def summary(results: Sequence[RecipientResult]) -> tuple[str | None, str | None]:
    """(last_error, last_error_code) of a Sent email from its recipients' results.

    ``recipients-deferred`` while some are still to be retried, ``recipients-refused`` once
    every recipient is settled and some did not get it, nothing when all were accepted.
    """
    parts: list[str] = []
    for r in results:
        own = r.code and r.status is not RecipientStatus.FAILED  # FAILED quotes the reply
        reply = f"{r.code} {r.message}".strip() if own else r.message
        if r.status is RecipientStatus.DEFERRED:
            when = r.next_attempt_at.isoformat(timespec="seconds") if r.next_attempt_at \
                else "now"
            parts.append(f"delivery to {r.address} pending: {reply} (attempt {r.attempts} "
                         f"of {MAX_ATTEMPTS}, next at {when})")
        elif r.status is not RecipientStatus.ACCEPTED:
            parts.append(f"not delivered to {r.address}: {reply}")
    if not parts:
        return None, None
    pending = any(r.status is RecipientStatus.DEFERRED for r in results)
    return "; ".join(parts), "recipients-deferred" if pending else "recipients-refused"
