"""Table tests for `core.tracking`: resolution, every rule, correlation order, loop guard."""

from __future__ import annotations

import datetime as dt

import pytest

from serversync.core.email import (
    CorrelationMethod,
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
    Regarding,
    Role,
)
from serversync.core.model import Party, PartyKind, TrackingRule
from serversync.core.tracking import (
    CorrelationIndex,
    KnownActivity,
    LoopPolicy,
    Receiver,
    accepts,
    clean_subject,
    correlate,
    decide,
    loop_step,
    receivers,
    resolve,
    thread_ids,
)

U = Party(PartyKind.USER, "alice", "Alice", ("a@x",), TrackingRule.NONE)
Q = Party(PartyKind.QUEUE, "support", "Support", ("s@x",), TrackingRule.ALL)
C = Party(PartyKind.CONTACT, "c1", "C", ("c@x",))
C2 = Party(PartyKind.CONTACT, "c2", "C2", ("c@x",))
A = Party(PartyKind.ACCOUNT, "a1", "A", ("c@x",))
L = Party(PartyKind.LEAD, "l1", "L", ("l@x",))
OT = Party(PartyKind.OTHER, "o1", "O", ("o@x",))


@pytest.mark.parametrize(("candidates", "expected"), [
    ((), None),
    ((C,), C),
    ((A, C), C),  # contact before account
    ((L, A), A),
    ((OT, L), L),
    ((C, U), U),  # users first
    ((C, C2), None),  # ambiguous → unresolved
    ((C, C2, U), U),  # ambiguity below the winner does not matter
    ((Q, C), Q),
])
def test_resolution_order(candidates: tuple[Party, ...], expected: Party | None) -> None:
    assert resolve(candidates) == expected


@pytest.mark.parametrize(("rule", "sender", "correlated", "expected"), [
    (TrackingRule.ALL, None, False, True),
    (TrackingRule.NONE, C, True, False),
    (TrackingRule.REPLIES, C, False, False),
    (TrackingRule.REPLIES, None, True, True),
    (TrackingRule.CONTACTS_ACCOUNTS_LEADS, C, False, True),
    (TrackingRule.CONTACTS_ACCOUNTS_LEADS, A, False, True),
    (TrackingRule.CONTACTS_ACCOUNTS_LEADS, L, False, True),
    (TrackingRule.CONTACTS_ACCOUNTS_LEADS, OT, False, False),
    (TrackingRule.CONTACTS_ACCOUNTS_LEADS, U, False, False),
    (TrackingRule.CONTACTS_ACCOUNTS_LEADS, None, False, False),
    (TrackingRule.EMAIL_ENABLED, OT, False, True),
    (TrackingRule.EMAIL_ENABLED, U, False, True),
    (TrackingRule.EMAIL_ENABLED, None, False, False),
])
def test_rules(rule: TrackingRule, sender: Party | None, correlated: bool,
               expected: bool) -> None:
    assert accepts(rule, sender=sender, correlated=correlated) is expected


def mail(subject: str = "Hello", **fields: object) -> EmailActivity:
    return EmailActivity(Direction.INCOMING, EmailStatus.RECEIVED, subject, "c@x",
                         **fields)  # type: ignore[arg-type]


K1 = KnownActivity(1, Regarding("account", "a1"), "user", "bob", "Offer",
                   frozenset({"c@x", "a@x"}))
K2 = KnownActivity(2, subject="Quote")
K3 = KnownActivity(3, subject="Call")
INDEX = CorrelationIndex({"<m1>": K1}, {1: K1, 2: K2, 3: K3}, {"conv": K3}, [K1])


@pytest.mark.parametrize(("activity", "smart", "method", "found"), [
    (mail(in_reply_to="<m1>"), False, CorrelationMethod.IN_REPLY_TO, 1),
    (mail(references=("<zz>", "<m1>")), False, CorrelationMethod.IN_REPLY_TO, 1),
    (mail("Re: x [SSY:000002]"), False, CorrelationMethod.TRACKING_TOKEN, 2),
    (mail("Re: x [SSY:000099]"), False, CorrelationMethod.NONE, None),  # unknown token
    (mail(conversation_id="conv"), False, CorrelationMethod.CONVERSATION, 3),
    # In-Reply-To wins over a token and a conversation
    (mail("[SSY:000002]", in_reply_to="<m1>", conversation_id="conv"), False,
     CorrelationMethod.IN_REPLY_TO, 1),
    (mail("[SSY:000002]", conversation_id="conv"), False, CorrelationMethod.TRACKING_TOKEN, 2),
    (mail("RE: Fwd: offer", recipients=(Recipient(Role.TO, "a@x"),)), True,
     CorrelationMethod.SMART_MATCHING, 1),
    (mail("RE: Fwd: offer", recipients=(Recipient(Role.TO, "a@x"),)), False,
     CorrelationMethod.NONE, None),  # smart matching is off by default
    (mail("RE: offer"), True, CorrelationMethod.NONE, None),  # one shared address only
])
def test_correlation_order(activity: EmailActivity, smart: bool, method: CorrelationMethod,
                           found: int | None) -> None:
    result = correlate(activity, INDEX, token_prefix="SSY", use_smart_matching=smart)
    assert result.method is method
    assert (result.activity.id if result.activity else None) == found


def test_thread_ids_cap_and_order() -> None:
    refs = tuple(f"<r{i}>" for i in range(40))
    ids = thread_ids(mail(in_reply_to="<irt>", references=refs))
    assert ids[0] == "<irt>" and ids[1] == "<r39>" and len(ids) == 33
    assert clean_subject("RE: AW: Fwd:  Big   Deal [SSY:000001]", "SSY") == "big deal"


def test_decide_owner_and_acceptance() -> None:
    owner = Receiver(PartyKind.USER, "alice", TrackingRule.NONE)
    activity = mail(recipients=(Recipient(Role.TO, "a@x"), Recipient(Role.CC, "s@x")))
    resolved = {"a@x": U, "s@x": Q, "c@x": C}
    found = receivers(activity, resolved, owner)
    assert [r.key for r in found] == ["alice", "support"]
    # alice says none, the queue on Cc says all: tracked, owned by the accepting queue
    decision = decide(activity, sender=C, receivers_=found, correlation=correlate(
        activity, INDEX, token_prefix="SSY"), mailbox_owner=owner)
    assert decision.track and (decision.owner_kind, decision.owner) == ("queue", "support")
    nobody = decide(mail(), sender=C, receivers_=[owner],
                    correlation=correlate(mail(), INDEX, token_prefix="SSY"),
                    mailbox_owner=owner)
    assert not nobody.track and "none" in nobody.reason
    queue = Receiver(PartyKind.QUEUE, "support", TrackingRule.ALL)
    assert decide(activity, sender=None, receivers_=[queue], correlation=correlate(
        mail(), INDEX, token_prefix="SSY"), mailbox_owner=queue).owner == "support"
    # the correlated activity's owner wins when it accepts
    bob = Receiver(PartyKind.USER, "bob", TrackingRule.REPLIES)
    me = Receiver(PartyKind.USER, "alice", TrackingRule.ALL)
    reply = mail(in_reply_to="<m1>")
    d = decide(reply, sender=C, receivers_=[me, bob],
               correlation=correlate(reply, INDEX, token_prefix="SSY"), mailbox_owner=me)
    assert d.owner == "bob"


def test_loop_guard() -> None:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    policy = LoopPolicy(threshold=2, minutes=10)
    step = loop_step(None, t0, policy)
    assert step.allowed and step.window.count == 1
    step = loop_step(step.window, t0, policy)
    assert step.allowed and step.window.count == 2
    step = loop_step(step.window, t0, policy)
    assert not step.allowed and step.newly_paused and step.window.paused
    again = loop_step(step.window, t0 + dt.timedelta(minutes=5), policy)
    assert not again.allowed and not again.newly_paused
    later = loop_step(step.window, t0 + dt.timedelta(minutes=10), policy)
    assert later.allowed and later.window.count == 1 and not later.window.paused
