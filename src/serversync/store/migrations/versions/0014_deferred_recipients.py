"""outgoing: deferred recipients are retried (follow-ups)

Revision ID: 0014
Revises: 0004

``deferred_due_at`` says when a Sent email's deferred recipients are next submitted to
(indexed with the mailbox, as the follow-up claim ranges over it); ``followup_recipients``
is the journal of a follow-up in progress. Per-recipient attempts and next attempt live in
``recipient_results`` (new keys; older entries read as 0 / none).

Before this revision deferred recipients of a Sent email were recorded and never retried.
Those entries are rewritten as ``failed`` with a reason that says so: showing them as
``deferred`` without a next attempt would promise a delivery that will not happen, and
retrying mail that old now would surprise its recipients more than it helps.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0004"
branch_labels = None
depends_on = None

NOT_RETRIED = ("not retried: deferred before serversync retried deferred recipients; "
               "last reply: ")


def upgrade() -> None:
    with op.batch_alter_table("outgoing", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deferred_due_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("followup_recipients", sa.JSON(), nullable=True))
        batch_op.create_index("ix_outgoing_mailbox_deferred", ["mailbox", "deferred_due_at"],
                              unique=False)
    _settle_legacy_deferrals()


_OUTGOING = sa.table("outgoing", sa.column("email_id", sa.Integer()),
                     sa.column("last_error_code", sa.String()),
                     sa.column("recipient_results", sa.JSON()))
_EMAILS = sa.table("emails", sa.column("id", sa.Integer()), sa.column("status", sa.String()))


def _rewrite(codes: tuple[str, ...], status: str, new_status: str, prefix: str) -> None:
    """Rewrite one recipient status in the results of Sent emails with these error codes."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_OUTGOING.c.email_id, _OUTGOING.c.recipient_results)
        .join(_EMAILS, _EMAILS.c.id == _OUTGOING.c.email_id)
        .where(_EMAILS.c.status == "sent", _OUTGOING.c.last_error_code.in_(codes))).all()
    for email_id, results in rows:
        changed = False
        settled: list[dict[str, Any]] = []
        for entry in results or []:
            if entry.get("status") == status:
                message = entry.get("message") or ""
                if prefix:
                    message = prefix + f"{entry.get('code') or ''} {message}".strip()
                entry = {**entry, "status": new_status, "message": message}
                changed = True
            settled.append(entry)
        if changed:
            bind.execute(sa.update(_OUTGOING).where(_OUTGOING.c.email_id == email_id)
                         .values(recipient_results=settled))


def _settle_legacy_deferrals() -> None:
    _rewrite(("recipients-refused",), "deferred", "failed", NOT_RETRIED)


def downgrade() -> None:
    # the older code knows no "failed" recipient; "rejected" is the nearest it can read,
    # and the deferred ones left would never be retried by it either
    _rewrite(("recipients-refused", "recipients-deferred"), "failed", "rejected", "")
    _rewrite(("recipients-refused", "recipients-deferred"), "deferred", "rejected",
             NOT_RETRIED)
    with op.batch_alter_table("outgoing", schema=None) as batch_op:
        batch_op.drop_index("ix_outgoing_mailbox_deferred")
        batch_op.drop_column("followup_recipients")
        batch_op.drop_column("deferred_due_at")
