"""The REST API (``/api/v1``): FastAPI routers over the services; OpenAPI at ``/docs``.

Thin endpoints: validate (inputs are `serversync.manifest` specs, the same models as the
config file, so a bad field gets the same one-line error), call one service, serialize
through `web.schemas`. Every route needs a bearer token (`web.deps.caller`); a reader token
may only read. Secrets are write-only, and may only be given as plain values here: the
config file's ``{env: ...}`` and ``{file: ...}`` references would let an API caller make the
server read its own environment or files into a credential, so the API refuses them.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response
from pydantic import BaseModel, Field

from serversync.core.access import Principal, Role
from serversync.core.email import Direction, EmailStatus
from serversync.core.errors import ConfigError, NotFound
from serversync.core.model import ApprovalStatus, Channel, PartyKind
from serversync.core.secret import Secret
from serversync.core.webhooks import Event
from serversync.manifest import (
    MailboxSpec,
    PartySpec,
    ProfileSpec,
    SettingsSpec,
)
from serversync.web.deps import WebContext, caller, context
from serversync.web.schemas import (
    PROFILE_SECRETS,
    AlertOut,
    DeliveryOut,
    EmailOut,
    MailboxOut,
    NewTokenOut,
    NewWebhookOut,
    PartyOut,
    ProfileOut,
    QuarantinedOut,
    ReachOut,
    RetryOut,
    RunOut,
    ScheduleOut,
    SignInOut,
    SignInStartOut,
    TestReportOut,
    TokenOut,
    WebhookOut,
    alert_out,
    delivery_out,
    email_out,
    mailbox_out,
    party_out,
    plain,
    profile_out,
    quarantined_out,
    report_out,
    retry_out,
    run_out,
    schedule_out,
    sign_in_out,
    sign_in_start_out,
    token_out,
    webhook_out,
)

Ctx = Annotated[WebContext, Depends(context)]
Who = Annotated[Principal, Depends(caller)]  # the router's own check: run once per request
router = APIRouter(prefix="/api/v1", dependencies=[Depends(caller)])


def reach_warning(uses_service_account: bool, mailboxes: int, scope: tuple[str, ...]) -> str:
    """The seed's warning about one account opening every mailbox, in numbers."""
    if not uses_service_account:
        return ""
    where = ", ".join(scope) if scope else "every mailbox on the server"
    return (f"this profile's credentials open {mailboxes} mailbox(es) here and may reach "
            f"{where}; if that single account is compromised, all of them are")


def refuse_secret_refs(data: Any, fields: tuple[str, ...]) -> None:
    for name in fields:
        value = data.get(name) if isinstance(data, dict) else getattr(data, name, None)
        if value is not None and not isinstance(value, str):
            raise ConfigError(name, "must be the secret itself here; {env: ...} and "
                              "{file: ...} references are accepted in config files only",
                              fix="send the value; it is stored encrypted and never returned")


# ---------------------------------------------------------------- profiles

@router.get("/profiles", response_model=list[ProfileOut], tags=["profiles"])
async def list_profiles(ctx: Ctx) -> list[dict[str, Any]]:
    out = []
    for profile in await ctx.services.list_profiles():
        reach = await ctx.services.reach(profile.name)
        out.append(profile_out(profile, reach.mailboxes))
    return out


@router.post("/profiles", response_model=ProfileOut, status_code=201, tags=["profiles"])
async def create_profile(ctx: Ctx, spec: ProfileSpec) -> dict[str, Any]:
    refuse_secret_refs(spec, PROFILE_SECRETS)
    return profile_out(await ctx.services.create_profile(spec), 0)


@router.get("/profiles/{name}", response_model=ProfileOut, tags=["profiles"])
async def get_profile(ctx: Ctx, name: str) -> dict[str, Any]:
    profile = await ctx.services.get_profile(name)
    return profile_out(profile, (await ctx.services.reach(name)).mailboxes)


@router.patch("/profiles/{name}", response_model=ProfileOut, tags=["profiles"])
async def update_profile(ctx: Ctx, name: str,
                         changes: Annotated[dict[str, Any], Body(
                             description="fields of ProfileSpec to change")]) -> dict[str, Any]:
    refuse_secret_refs(changes, PROFILE_SECRETS)
    profile = await ctx.services.update_profile(name, changes)
    return profile_out(profile, (await ctx.services.reach(name)).mailboxes)


@router.delete("/profiles/{name}", status_code=204, tags=["profiles"])
async def delete_profile(ctx: Ctx, name: str) -> Response:
    await ctx.services.delete_profile(name)
    return Response(status_code=204)


@router.get("/profiles/{name}/reach", response_model=ReachOut, tags=["profiles"])
async def profile_reach(ctx: Ctx, name: str) -> ReachOut:
    from serversync.core.rules import access_mode
    reach = await ctx.services.reach(name)
    profile = await ctx.services.get_profile(name)
    return ReachOut(profile=name, uses_service_account=reach.uses_service_account,
                    access=access_mode(profile).value, mailboxes=reach.mailboxes,
                    scope=list(reach.scope),
                    warning=reach_warning(reach.uses_service_account, reach.mailboxes,
                                          reach.scope))


@router.post("/profiles/{name}/test-enable", response_model=list[TestReportOut],
             tags=["profiles"])
async def test_enable_profile(ctx: Ctx, name: str) -> list[TestReportOut]:
    return [report_out(r) for r in await ctx.services.test_enable_profile(name)]


# ---------------------------------------------------------------- mailboxes

@router.get("/mailboxes", response_model=list[MailboxOut], tags=["mailboxes"])
async def list_mailboxes(ctx: Ctx, profile: str | None = None) -> list[MailboxOut]:
    return [mailbox_out(m) for m in await ctx.services.list_mailboxes(profile)]


@router.post("/mailboxes", response_model=MailboxOut, status_code=201, tags=["mailboxes"])
async def create_mailbox(ctx: Ctx, spec: MailboxSpec) -> MailboxOut:
    refuse_secret_refs(spec, ("secret",))
    return mailbox_out(await ctx.services.create_mailbox(spec))


@router.get("/mailboxes/{address}", response_model=MailboxOut, tags=["mailboxes"])
async def get_mailbox(ctx: Ctx, address: str) -> MailboxOut:
    return mailbox_out(await ctx.services.get_mailbox(address))


@router.patch("/mailboxes/{address}", response_model=MailboxOut, tags=["mailboxes"])
async def update_mailbox(ctx: Ctx, address: str,
                         changes: Annotated[dict[str, Any], Body(
                             description="fields of MailboxSpec to change")]) -> MailboxOut:
    refuse_secret_refs(changes, ("secret",))
    return mailbox_out(await ctx.services.update_mailbox(address, changes))


@router.delete("/mailboxes/{address}", status_code=204, tags=["mailboxes"])
async def delete_mailbox(ctx: Ctx, address: str) -> Response:
    await ctx.services.delete_mailbox(address)
    return Response(status_code=204)


@router.post("/mailboxes/{address}/test-enable", response_model=TestReportOut,
             tags=["mailboxes"])
async def test_enable(ctx: Ctx, address: str) -> TestReportOut:
    """Connect for real on each server-side channel; enable what works, alert on what fails."""
    return report_out(await ctx.services.test_enable(address))


@router.post("/mailboxes/{address}/approve", response_model=MailboxOut, tags=["mailboxes"])
async def approve(ctx: Ctx, address: str) -> MailboxOut:
    return mailbox_out(await ctx.services.set_approval(address, ApprovalStatus.APPROVED))


@router.post("/mailboxes/{address}/reject", response_model=MailboxOut, tags=["mailboxes"])
async def reject(ctx: Ctx, address: str) -> MailboxOut:
    """Reject the address: every channel is disabled."""
    return mailbox_out(await ctx.services.set_approval(address, ApprovalStatus.REJECTED))


class ChannelSwitch(BaseModel):
    enabled: bool


@router.put("/mailboxes/{address}/channels/{channel}", response_model=MailboxOut,
            tags=["mailboxes"])
async def switch_channel(ctx: Ctx, address: str, channel: Channel,
                         switch: ChannelSwitch) -> MailboxOut:
    """Turn one channel off, or back on after a passed test."""
    return mailbox_out(await ctx.controls.set_channel_enabled(address, channel, switch.enabled))


@router.post("/mailboxes/{address}/channels/{channel}/sync", status_code=202,
             tags=["mailboxes"])
async def sync_now(ctx: Ctx, address: str, channel: Channel) -> dict[str, Any]:
    """"Sync now": the channel is due at once (a server-imposed backoff still holds)."""
    await ctx.runlog.request_sync(address, channel)
    return {"mailbox": address, "channel": channel.value, "requested": True}


@router.post("/mailboxes/{address}/sign-in", response_model=SignInStartOut, status_code=202,
             tags=["mailboxes"])
async def start_sign_in(ctx: Ctx, who: Who, address: str) -> SignInStartOut:
    """Start the mailbox user's own sign-in (Exchange Online, ``credential_source: mailbox``).

    Answers at once with the code the user types at ``verification_uri``; serversync then
    waits for the sign-in in the background and stores the refresh token (encrypted, never
    returned). Read the outcome with ``GET``. Starting again replaces a pending sign-in.
    """
    return sign_in_start_out(await ctx.services.sign_ins.start(address, by=f"api:{who.name}"))


@router.get("/mailboxes/{address}/sign-in", response_model=SignInOut, tags=["mailboxes"])
async def get_sign_in(ctx: Ctx, address: str) -> SignInOut:
    """The latest sign-in's state: ``pending``, ``done`` (``signed_in_as``), ``failed`` or
    ``expired`` (``error`` with code, message and fix); 404 if none was started."""
    return sign_in_out(await ctx.services.sign_ins.get(address))


@router.get("/mailboxes/{address}/schedule", response_model=list[ScheduleOut],
            tags=["mailboxes"])
async def mailbox_schedule(ctx: Ctx, address: str) -> list[ScheduleOut]:
    return [schedule_out(s) for s in await ctx.runlog.schedules(address)]


@router.get("/mailboxes/{address}/alerts", response_model=list[AlertOut], tags=["mailboxes"])
async def mailbox_alerts(ctx: Ctx, address: str, include_resolved: bool = False
                         ) -> list[AlertOut]:
    await ctx.services.get_mailbox(address)
    return [alert_out(a) for a in await ctx.services.alerts(
        mailbox=address, include_resolved=include_resolved)]


# ---------------------------------------------------------------- directory

@router.get("/directory", response_model=list[PartyOut], tags=["directory"])
async def list_directory(ctx: Ctx, kind: PartyKind | None = None) -> list[PartyOut]:
    return [party_out(p) for p in await ctx.services.list_parties(kind)]


@router.post("/directory", response_model=PartyOut, tags=["directory"])
async def save_party(ctx: Ctx, spec: PartySpec) -> PartyOut:
    """Create or update a user, queue, contact, account, lead or other record."""
    return party_out(await ctx.services.save_party(spec.to_core()))


@router.delete("/directory/{kind}/{key}", status_code=204, tags=["directory"])
async def delete_party(ctx: Ctx, kind: PartyKind, key: str) -> Response:
    await ctx.controls.delete_party(kind, key)
    return Response(status_code=204)


@router.get("/settings", response_model=SettingsSpec, tags=["directory"])
async def get_settings(ctx: Ctx) -> dict[str, Any]:
    data: dict[str, Any] = plain(await ctx.services.settings())
    return data


@router.put("/settings", response_model=SettingsSpec, tags=["directory"])
async def put_settings(ctx: Ctx, spec: SettingsSpec) -> SettingsSpec:
    await ctx.services.save_settings(spec.to_core())
    return spec


# ---------------------------------------------------------------- activities

@router.get("/activities/emails", response_model=list[EmailOut], tags=["activities"])
async def list_emails(ctx: Ctx, direction: Direction | None = None,
                      status: EmailStatus | None = None,
                      mailbox: Annotated[str | None, Query(
                          description="outgoing: the sending mailbox")] = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50,
                      before_id: int | None = None) -> list[EmailOut]:
    """Email activities, newest first; page with ``before_id``."""
    found = await ctx.activities.emails(direction=direction, status=status, mailbox=mailbox,
                                        limit=limit, before_id=before_id)
    return [email_out(a, bodies=False) for a in found]


@router.get("/activities/emails/{email_id}", response_model=EmailOut, tags=["activities"])
async def get_email(ctx: Ctx, email_id: int) -> EmailOut:
    return email_out(await ctx.activities.email(email_id), bodies=True)


@router.get("/activities/emails/{email_id}/attachments/{position}", tags=["activities"],
            response_class=Response)
async def get_attachment(ctx: Ctx, email_id: int, position: int) -> Response:
    attachment = await ctx.activities.attachment(email_id, position)
    if attachment.content is None:
        raise NotFound(f"attachment {position} of email activity {email_id} was not kept",
                       fix=attachment.notice or "it was not stored")
    # Served as a download, never rendered: an attachment's HTML must not run on our origin.
    name = attachment.name.replace('"', "").replace("\r", "").replace("\n", "") or "attachment"
    return Response(attachment.content, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"',
                             "X-Content-Type-Options": "nosniff"})


# ---------------------------------------------------------------- quarantine

@router.get("/quarantine", response_model=list[QuarantinedOut], tags=["quarantine"])
async def list_quarantine(ctx: Ctx, mailbox: str | None = None, include_released: bool = False,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                          before_id: int | None = None) -> list[QuarantinedOut]:
    """Incoming messages that could not be tracked, newest first; page with ``before_id``."""
    return [quarantined_out(m) for m in await ctx.quarantine.messages(
        mailbox=mailbox, include_released=include_released, limit=limit, before_id=before_id)]


@router.post("/quarantine/retry", response_model=list[RetryOut], tags=["quarantine"])
async def retry_quarantine_of_mailbox(ctx: Ctx, who: Who, mailbox: Annotated[str, Query(
        description="retry every message of this mailbox still in quarantine")]
        ) -> list[RetryOut]:
    return [retry_out(r) for r in await ctx.quarantine.retry_mailbox(
        mailbox, by=f"api:{who.name}")]


@router.get("/quarantine/{quarantine_id}", response_model=QuarantinedOut, tags=["quarantine"])
async def get_quarantined(ctx: Ctx, quarantine_id: int) -> QuarantinedOut:
    return quarantined_out(await ctx.quarantine.get(quarantine_id))


@router.get("/quarantine/{quarantine_id}/raw", tags=["quarantine"], response_class=Response,
            responses={200: {"content": {"message/rfc822": {}}}})
async def get_quarantined_raw(ctx: Ctx, quarantine_id: int) -> Response:
    """The message exactly as read from the server, as a download (never rendered)."""
    raw = await ctx.quarantine.raw(quarantine_id)
    return Response(raw, media_type="message/rfc822", headers={
        "Content-Disposition": f'attachment; filename="quarantine-{quarantine_id}.eml"',
        "X-Content-Type-Options": "nosniff"})


@router.post("/quarantine/{quarantine_id}/retry", response_model=RetryOut, tags=["quarantine"])
async def retry_quarantined(ctx: Ctx, who: Who, quarantine_id: int) -> RetryOut:
    """Process the message again (after fixing the cause): 200 with ``released`` true and
    the activity, or false with the new reason; 409 if it already left the quarantine."""
    return retry_out(await ctx.quarantine.retry(quarantine_id, by=f"api:{who.name}"))


@router.post("/quarantine/{quarantine_id}/discard", response_model=QuarantinedOut,
             tags=["quarantine"])
async def discard_quarantined(ctx: Ctx, who: Who, quarantine_id: int) -> QuarantinedOut:
    """Release the message without an activity; who and when are recorded on it."""
    return quarantined_out(await ctx.quarantine.discard(quarantine_id,
                                                        by=f"api:{who.name}"))


# ---------------------------------------------------------------- alerts and runs

@router.get("/alerts", response_model=list[AlertOut], tags=["alerts"])
async def list_alerts(ctx: Ctx, mailbox: str | None = None, profile: str | None = None,
                      include_resolved: bool = False) -> list[AlertOut]:
    return [alert_out(a) for a in await ctx.services.alerts(
        mailbox=mailbox, profile=profile, include_resolved=include_resolved)]


@router.post("/alerts/{alert_id}/resolve", status_code=204, tags=["alerts"])
async def resolve_alert(ctx: Ctx, alert_id: int) -> Response:
    await ctx.controls.resolve_alert(alert_id)
    return Response(status_code=204)


@router.get("/runs", response_model=list[RunOut], tags=["runs"])
async def list_runs(ctx: Ctx, mailbox: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[RunOut]:
    """Recorded sync runs, newest first: start, end, items, failures, error."""
    return [run_out(r) for r in await ctx.runlog.recent(mailbox=mailbox, limit=limit)]


@router.get("/schedules", response_model=list[ScheduleOut], tags=["runs"])
async def list_schedules(ctx: Ctx, mailbox: str | None = None) -> list[ScheduleOut]:
    """Each server-side channel: last success, next run and why."""
    return [schedule_out(s) for s in await ctx.runlog.schedules(mailbox)]


@router.get("/stats", tags=["runs"])
async def stats(ctx: Ctx, hours: Annotated[int, Query(ge=1, le=24 * 14)] = 24
                ) -> dict[str, Any]:
    """Runs, items and failures per hour, sync latency percentiles, mailboxes by status."""
    figures: dict[str, Any] = await ctx.runlog.stats(ctx.clock() - dt.timedelta(hours=hours))
    return figures


# ---------------------------------------------------------------- tokens

class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: Role = Role.READER


@router.get("/tokens", response_model=list[TokenOut], tags=["tokens"])
async def list_tokens(ctx: Ctx, include_revoked: bool = False) -> list[dict[str, Any]]:
    return [token_out(t) for t in await ctx.tokens.all(include_revoked=include_revoked)]


@router.post("/tokens", response_model=NewTokenOut, status_code=201, tags=["tokens"])
async def create_token(ctx: Ctx, body: TokenIn) -> dict[str, Any]:
    """Create a token; the response carries it once (only its hash is kept)."""
    created = await ctx.tokens.create(body.name, body.role)
    return {**token_out(created.token), "token": created.value}


@router.delete("/tokens/{name}", status_code=204, tags=["tokens"])
async def revoke_token(ctx: Ctx, name: str) -> Response:
    await ctx.tokens.revoke(name)
    return Response(status_code=204)


# ---------------------------------------------------------------- webhooks

class WebhookIn(BaseModel):
    url: str = Field(min_length=8, max_length=2000)
    events: list[Event] = Field(min_length=1)
    secret: str | None = Field(None, min_length=16, description=(
        "the HMAC signing secret; leave out to have one generated (shown once)"))
    description: str = ""
    active: bool = True


class WebhookPatch(BaseModel):
    active: bool


@router.get("/webhooks", response_model=list[WebhookOut], tags=["webhooks"])
async def list_webhooks(ctx: Ctx) -> list[dict[str, Any]]:
    return [webhook_out(h) for h in await ctx.webhooks.all()]


@router.post("/webhooks", response_model=NewWebhookOut, status_code=201, tags=["webhooks"])
async def create_webhook(ctx: Ctx, body: WebhookIn) -> dict[str, Any]:
    created = await ctx.webhooks.create(
        body.url, body.events, secret=Secret(body.secret) if body.secret else None,
        description=body.description, active=body.active)
    return {**webhook_out(created.webhook), "generated_secret": created.generated_secret}


@router.get("/webhooks/{webhook_id}", response_model=WebhookOut, tags=["webhooks"])
async def get_webhook(ctx: Ctx, webhook_id: int) -> dict[str, Any]:
    return webhook_out(await ctx.webhooks.get(webhook_id))


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut, tags=["webhooks"])
async def patch_webhook(ctx: Ctx, webhook_id: int, body: WebhookPatch) -> dict[str, Any]:
    return webhook_out(await ctx.webhooks.set_active(webhook_id, body.active))


@router.delete("/webhooks/{webhook_id}", status_code=204, tags=["webhooks"])
async def delete_webhook(ctx: Ctx, webhook_id: int) -> Response:
    await ctx.webhooks.delete(webhook_id)
    return Response(status_code=204)


@router.post("/webhooks/{webhook_id}/ping", status_code=202, tags=["webhooks"])
async def ping_webhook(ctx: Ctx, webhook_id: int) -> dict[str, Any]:
    """Queue a signed ``ping`` delivery (sent by the next delivery round)."""
    await ctx.webhooks.ping(webhook_id)
    return {"webhook": webhook_id, "queued": True}


@router.get("/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryOut],
            tags=["webhooks"])
async def list_deliveries(ctx: Ctx, webhook_id: int,
                          limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[DeliveryOut]:
    await ctx.webhooks.get(webhook_id)
    return [delivery_out(d) for d in await ctx.webhooks.deliveries(webhook_id, limit)]

