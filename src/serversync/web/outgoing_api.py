"""REST routes that create outgoing email activities (``services.outgoing``).

``POST /api/v1/activities/emails`` puts a new outgoing email activity in *Pending Send*; the
outgoing channel of its sender mailbox sends it (`services.outgoing.OutgoingService`).
``POST .../{id}/cancel`` cancels one that has not been sent. Admin tokens only (like every
write). Attachments are given as base64.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from serversync.core.email import Attachment, Regarding
from serversync.core.errors import ConfigError
from serversync.core.outgoing import Priority
from serversync.services.outgoing import NewEmail, OutgoingService
from serversync.web.deps import WebContext, caller, context
from serversync.web.schemas import EmailOut, email_out

router = APIRouter(prefix="/api/v1", dependencies=[Depends(caller)])
Ctx = Annotated[WebContext, Depends(context)]


class AttachmentIn(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    content_type: str = "application/octet-stream"
    content_base64: str


class RegardingIn(BaseModel):
    kind: str = Field(min_length=1, max_length=50)
    key: str = Field(min_length=1, max_length=255)


class NewEmailIn(BaseModel):
    sender_mailbox: str = Field(min_length=3, max_length=320)
    subject: str = Field(max_length=998)
    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    text: str = ""
    html: str = ""
    attachments: list[AttachmentIn] = Field(default_factory=list)
    reply_to_activity: int | None = None
    send_after: dt.datetime | None = None
    priority: Annotated[str, Field(pattern="^(low|normal|high)$")] = "normal"
    regarding: RegardingIn | None = None
    save_to_sent: bool = True


def _outgoing(ctx: WebContext) -> OutgoingService:
    found = ctx.extras.get("outgoing")
    if isinstance(found, OutgoingService):
        return found
    service = OutgoingService(ctx.services.db, clock=ctx.clock)
    ctx.extras["outgoing"] = service
    return service


@router.post("/activities/emails", response_model=EmailOut, status_code=201,
             tags=["activities"])
async def create_email(ctx: Ctx, body: NewEmailIn) -> EmailOut:
    """Create an outgoing email activity in Pending Send; its mailbox's outgoing channel sends it."""
    attachments = []
    for i, a in enumerate(body.attachments):
        try:
            content = base64.b64decode(a.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"attachments[{i}].content_base64", "is not base64") from None
        attachments.append(Attachment(a.name, a.content_type, len(content), content))
    created = await _outgoing(ctx).create(NewEmail(
        sender_mailbox=body.sender_mailbox, subject=body.subject, to=body.to, cc=body.cc,
        bcc=body.bcc, text=body.text, html=body.html, attachments=attachments,
        reply_to_activity=body.reply_to_activity, send_after=body.send_after,
        priority=Priority[body.priority.upper()],
        regarding=Regarding(body.regarding.kind, body.regarding.key) if body.regarding else None,
        save_to_sent=body.save_to_sent))
    return email_out(created, bodies=True)


@router.post("/activities/emails/{email_id}/cancel", status_code=204, tags=["activities"])
async def cancel_email(ctx: Ctx, email_id: int) -> Response:
    """Cancel an outgoing email activity that has not been sent yet."""
    await _outgoing(ctx).cancel(email_id)
    return Response(status_code=204)
