"""Which incoming mail becomes an email activity, tied to what, and owned by whom.

Pure functions over values, table-tested in ``tests/unit/test_tracking.py``. The reference
behaviour (dynamics-sss.md §3.2-3.4) in four steps, each with one home here:

1. **Resolution** (`resolve`): an address becomes the first directory record in the order
   user, queue, contact, account, lead, other email-enabled record. Two records of the
   winning kind make the address *ambiguous*, and an ambiguous address stays unresolved
   (a wrong owner or regarding record is worse than none).
2. **Correlation** (`correlate`): In-Reply-To/References (last 32 ids, as Odoo caps them)
   → tracking token in the subject → conversation header (Thread-Index root or
   X-Conversation-ID) → smart matching (off by default; same cleaned subject and at least
   two shared addresses). The regarding record is copied from the correlated activity.
3. **Tracking rules** (`decide`): the message is tracked when the receiving mailbox's owner
   or any resolved user/queue recipient accepts it under its rule — all · replies to
   tracked email · from contacts/accounts/leads · from any email-enabled record · none.
   Queue mailboxes own what they track; otherwise the owner of the correlated activity,
   then the receiving mailbox's owner, then the first accepting recipient (To→Cc→Bcc).
4. **Loop guard** (`loop_step`): a sender that creates more than N activities in M minutes
   (Odoo's 20 / 120 min) is paused; its further mail is quarantined, not dropped.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from serversync.core.email import CorrelationMethod, EmailActivity, Regarding, Role
from serversync.core.model import Party, PartyKind, TrackingRule
from serversync.core.tokens import find_token, strip_token

RESOLUTION_ORDER = (PartyKind.USER, PartyKind.QUEUE, PartyKind.CONTACT, PartyKind.ACCOUNT,
                    PartyKind.LEAD, PartyKind.OTHER)
MAX_REFERENCES = 32
_NOISE = re.compile(r"^\s*(\w+\s?:\s*)+")
_SPACES = re.compile(r"\s+")


# ---------------------------------------------------------------- resolution

def resolve(candidates: Sequence[Party]) -> Party | None:
    """The record an address stands for, or None when unknown or ambiguous."""
    for kind in RESOLUTION_ORDER:
        matches = [p for p in candidates if p.kind is kind]
        if len(matches) == 1:
            return matches[0]
        if matches:
            return None  # ambiguous: several records of the best kind
    return None


def resolve_all(addresses: Iterable[str],
                directory: Mapping[str, Sequence[Party]]) -> dict[str, Party | None]:
    return {a: resolve(directory.get(a, ())) for a in addresses}


# ---------------------------------------------------------------- correlation

@dataclass(frozen=True, slots=True)
class KnownActivity:
    """What correlation needs to know about an earlier activity."""

    id: int
    regarding: Regarding | None = None
    owner_kind: str | None = None
    owner: str | None = None
    subject: str = ""
    addresses: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CorrelationIndex:
    """Earlier activities looked up for one batch (the service does the queries)."""

    by_message_id: Mapping[str, KnownActivity]
    by_id: Mapping[int, KnownActivity]  # tracking tokens carry activity ids
    by_conversation: Mapping[str, KnownActivity]
    recent: Sequence[KnownActivity] = ()  # smart-matching candidates


@dataclass(frozen=True, slots=True)
class Correlation:
    method: CorrelationMethod = CorrelationMethod.NONE
    activity: KnownActivity | None = None

    @property
    def found(self) -> bool:
        return self.activity is not None


def thread_ids(activity: EmailActivity) -> list[str]:
    """In-Reply-To first, then References newest first, at most 32 (Odoo's cap)."""
    ids = [activity.in_reply_to] if activity.in_reply_to else []
    ids += list(reversed(activity.references[-MAX_REFERENCES:]))
    return list(dict.fromkeys(i for i in ids if i))


def clean_subject(subject: str, prefix: str) -> str:
    """Subject without Re:/Fwd:/AW: prefixes, tracking tokens and extra spaces, lower-cased."""
    text = _NOISE.sub("", strip_token(subject, prefix))
    return _SPACES.sub(" ", text).strip().lower()


def smart_match(activity: EmailActivity, candidates: Sequence[KnownActivity],
                prefix: str) -> KnownActivity | None:
    """Same cleaned subject and at least two shared addresses; the newest candidate wins."""
    subject = clean_subject(activity.subject, prefix)
    if not subject:
        return None
    addresses = {a.lower() for a in activity.addresses()} | {activity.sender.lower()}
    best: KnownActivity | None = None
    for known in candidates:
        if clean_subject(known.subject, prefix) == subject and \
                len(addresses & known.addresses) >= 2 and (best is None or known.id > best.id):
            best = known
    return best


def correlate(activity: EmailActivity, index: CorrelationIndex, *, token_prefix: str,
              use_tokens: bool = True, use_smart_matching: bool = False) -> Correlation:
    """The first correlation path that finds an earlier activity, in the reference order."""
    for message_id in thread_ids(activity):
        known = index.by_message_id.get(message_id)
        if known is not None:
            return Correlation(CorrelationMethod.IN_REPLY_TO, known)
    if use_tokens:
        token = find_token(activity.subject, token_prefix)
        if token is not None and token in index.by_id:
            return Correlation(CorrelationMethod.TRACKING_TOKEN, index.by_id[token])
    if activity.conversation_id and activity.conversation_id in index.by_conversation:
        return Correlation(CorrelationMethod.CONVERSATION,
                           index.by_conversation[activity.conversation_id])
    if use_smart_matching:
        known = smart_match(activity, index.recent, token_prefix)
        if known is not None:
            return Correlation(CorrelationMethod.SMART_MATCHING, known)
    return Correlation()


# ---------------------------------------------------------------- tracking rules

@dataclass(frozen=True, slots=True)
class Receiver:
    """A user or queue that may accept the message, with its tracking rule."""

    kind: PartyKind
    key: str
    rule: TrackingRule


@dataclass(frozen=True, slots=True)
class Decision:
    track: bool
    reason: str
    owner_kind: str | None = None
    owner: str | None = None
    accepted_by: tuple[str, ...] = ()  # "user:alice", "queue:support"


_CAL = (PartyKind.CONTACT, PartyKind.ACCOUNT, PartyKind.LEAD)


def accepts(rule: TrackingRule, *, sender: Party | None, correlated: bool) -> bool:
    """One receiver's tracking rule applied to one message."""
    if rule is TrackingRule.ALL:
        return True
    if rule is TrackingRule.REPLIES:
        return correlated
    if rule is TrackingRule.CONTACTS_ACCOUNTS_LEADS:
        return sender is not None and sender.kind in _CAL
    if rule is TrackingRule.EMAIL_ENABLED:
        return sender is not None
    return False


def receivers(activity: EmailActivity, resolved: Mapping[str, Party | None],
              mailbox_owner: Receiver) -> list[Receiver]:
    """Resolved users and queues on To, Cc, Bcc (in that order), plus the mailbox's owner.

    The receiving mailbox's owner always counts, with the mailbox's own rule: mail reaches a
    mailbox through Bcc and distribution lists without naming it.
    """
    found: dict[tuple[PartyKind, str], Receiver] = {
        (mailbox_owner.kind, mailbox_owner.key): mailbox_owner}
    for role in (Role.TO, Role.CC, Role.BCC):
        for address in activity.addresses(role):
            party = resolved.get(address.lower())
            if party is not None and party.kind in (PartyKind.USER, PartyKind.QUEUE):
                found.setdefault((party.kind, party.key),
                                 Receiver(party.kind, party.key, party.tracking_rule))
    ordered = [r for k, r in found.items() if k != (mailbox_owner.kind, mailbox_owner.key)]
    return [mailbox_owner, *ordered]


def decide(activity: EmailActivity, *, sender: Party | None, receivers_: Sequence[Receiver],
           correlation: Correlation, mailbox_owner: Receiver) -> Decision:
    """Track or not, and the owner, for one incoming message in one receiving mailbox."""
    correlated = correlation.found
    accepting = [r for r in receivers_ if accepts(r.rule, sender=sender, correlated=correlated)]
    if not accepting:
        rules = ", ".join(sorted({r.rule.value for r in receivers_}))
        return Decision(False, f"no recipient accepts it (rules: {rules})")
    names = tuple(f"{r.kind.value}:{r.key}" for r in accepting)
    if mailbox_owner.kind is PartyKind.QUEUE:
        return Decision(True, "accepted", mailbox_owner.kind.value, mailbox_owner.key, names)
    known = correlation.activity
    if known is not None and known.owner_kind and known.owner and any(
            r.kind.value == known.owner_kind and r.key == known.owner for r in accepting):
        return Decision(True, "accepted", known.owner_kind, known.owner, names)
    owner = mailbox_owner if mailbox_owner in accepting else accepting[0]
    return Decision(True, "accepted", owner.kind.value, owner.key, names)


# ---------------------------------------------------------------- loop guard

@dataclass(frozen=True, slots=True)
class LoopPolicy:
    threshold: int = 20  # activities per sender ...
    minutes: int = 120  # ... per window


@dataclass(frozen=True, slots=True)
class LoopWindow:
    """One sender's counter: activities created since ``started_at``; paused when over."""

    started_at: dt.datetime
    count: int = 0
    paused: bool = False


@dataclass(frozen=True, slots=True)
class LoopStep:
    window: LoopWindow
    allowed: bool
    newly_paused: bool = False


def loop_step(window: LoopWindow | None, now: dt.datetime, policy: LoopPolicy) -> LoopStep:
    """Count one more activity from a sender; pause the sender once it is over the limit.

    A paused sender stays paused until its window ends (then counting starts afresh) or an
    administrator resumes it; what it sends meanwhile is quarantined.
    """
    if window is None or now - window.started_at >= dt.timedelta(minutes=policy.minutes):
        window = LoopWindow(now)
    if window.paused:
        return LoopStep(window, allowed=False)
    if window.count + 1 > policy.threshold:
        return LoopStep(LoopWindow(window.started_at, window.count, True), allowed=False,
                        newly_paused=True)
    return LoopStep(LoopWindow(window.started_at, window.count + 1), allowed=True)
