"""The outgoing channel's contract, for every backend (see `tests.contract.backends`).

A pending email is sent exactly once, its copy lands in the sender's Sent folder, and it is
marked Sent with its Message-ID; running the job again sends nothing; a recipient the
server refuses for good fails that email with the server's reason, and the others are sent.
"""

from __future__ import annotations

from serversync.core.email import EmailStatus
from serversync.core.model import Channel
from serversync.core.outgoing import CopyState
from serversync.services.outgoing import NewEmail, OutgoingService
from serversync.store.db import Database
from tests.contract.backends import Backend


async def test_a_pending_email_is_sent_once_and_filed_in_sent(backend: Backend,
                                                              db: Database) -> None:
    await backend.setup(Channel.OUTGOING)
    outgoing = OutgoingService(db)
    created = await outgoing.create(NewEmail(backend.user, "Offer", to=[backend.recipient],
                                             text="The offer, as agreed."))
    assert created.status is EmailStatus.PENDING_SEND and created.id is not None
    mid = created.message_id
    assert mid
    summary = await outgoing(backend.user)
    assert (summary.items, summary.failures, summary.more) == (1, 0, False), summary
    state = await outgoing.state(created.id)
    assert state.status is EmailStatus.SENT and state.message_id == mid
    assert state.attempts == 1 and state.sent_copy is CopyState.DONE

    rerun = await outgoing(backend.user)  # nothing is due any more
    assert (rerun.items, rerun.failures) == (0, 0), rerun
    assert (await outgoing.state(created.id)).attempts == 1
    assert backend.accepted(mid) == 1
    assert backend.sent_copies(mid) == 1


async def test_a_refused_recipient_fails_that_email_with_the_reason(backend: Backend,
                                                                    db: Database) -> None:
    await backend.setup(Channel.OUTGOING)
    refused = backend.refuse()
    outgoing = OutgoingService(db)
    doomed = await outgoing.create(NewEmail(backend.user, "To nobody", to=[refused], text="x"))
    fine = await outgoing.create(NewEmail(backend.user, "Fine", to=[backend.recipient],
                                          text="y"))
    assert doomed.id is not None and fine.id is not None
    summary = await outgoing(backend.user)
    assert (summary.items, summary.failures) == (1, 1), summary
    state = await outgoing.state(doomed.id)
    assert state.status is EmailStatus.FAILED and state.last_error_code
    assert state.last_error and backend.refusal in state.last_error  # the server's words
    assert (await outgoing.state(fine.id)).status is EmailStatus.SENT

    assert (await outgoing(backend.user)).items == 0  # a failed email is not retried
    assert (await outgoing.state(doomed.id)).status is EmailStatus.FAILED
    assert backend.accepted(doomed.message_id or "", expected=False) == 0
    assert backend.accepted(fine.message_id or "") == 1
