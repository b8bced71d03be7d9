"""Reading email activities for the REST API and the admin UI.

The web layer never opens a session or touches a table: it asks these functions, which run
`store.emails.EmailStore` inside one read transaction each and return `core.email` types.
Writes (creating outgoing email, appointments, contacts and tasks) belong to the outgoing
and ACT services.
"""

from __future__ import annotations

from serversync.core.email import Attachment, Direction, EmailActivity, EmailStatus
from serversync.core.errors import NotFound
from serversync.store.db import Database
from serversync.store.emails import EmailStore

MAX_PAGE = 500


class Activities:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def emails(self, *, direction: Direction | None = None,
                     status: EmailStatus | None = None, mailbox: str | None = None,
                     limit: int = 50, before_id: int | None = None) -> list[EmailActivity]:
        """Newest first; page with ``before_id`` (the smallest id of the previous page)."""
        async with self.db.transaction() as repo:
            return await EmailStore(repo.session).list(
                direction=direction, status=status,
                sender_mailbox=mailbox.strip().lower() if mailbox else None,
                limit=max(1, min(limit, MAX_PAGE)), before_id=before_id)

    async def email(self, email_id: int) -> EmailActivity:
        async with self.db.transaction() as repo:
            return await EmailStore(repo.session).get(email_id)

    async def attachment(self, email_id: int, position: int) -> Attachment:
        """One attachment with its content (None when it was not kept; ``notice`` says why)."""
        async with self.db.transaction() as repo:
            activity = await EmailStore(repo.session).get(email_id, with_content=True)
        if not 0 <= position < len(activity.attachments):
            raise NotFound(f"email activity {email_id} has no attachment {position}",
                           fix=f"it has {len(activity.attachments)} attachment(s), "
                               "numbered from 0")
        return activity.attachments[position]
