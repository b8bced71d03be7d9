"""Pydantic models of the REST API's responses (inputs reuse `serversync.manifest`).

Secrets are write-only: a response says only whether a secret is ``"set"`` or ``"not set"``.
Every response is filtered through one of these models, so a field that is not declared
here cannot leak out, whatever the core object carries. `ProfileOut` is derived from
`manifest.ProfileSpec` so that the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from serversync.core.access import ApiToken, Role
from serversync.core.email import EmailActivity
from serversync.core.model import Alert, Mailbox, Party, Profile
from serversync.core.schedule import ChannelSchedule, Run
from serversync.core.secret import Secret
from serversync.core.signin import SignIn, SignInStatus
from serversync.core.webhooks import Delivery, Event, Webhook
from serversync.manifest import ProfileSpec, profile_to_spec
from serversync.services import ChannelResult, TestReport
from serversync.services.quarantine import QuarantinedMessage, RetryResult

SecretState = Literal["set", "not set"]
PROFILE_SECRETS = ("service_secret", "outgoing_service_secret", "client_secret",
                   "client_certificate")


def secret_state(value: Secret | None) -> SecretState:
    return "set" if value is not None else "not set"


def plain(value: Any) -> Any:
    """JSON-ready values; a `Secret` becomes "set" (callers never pass one on purpose)."""
    if isinstance(value, Secret):
        return "set"
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _profile_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, info in ProfileSpec.model_fields.items():
        if name in PROFILE_SECRETS:
            fields[name] = (SecretState, "not set")
        else:
            fields[name] = (info.annotation, info)
    fields["id"] = (int | None, None)
    fields["access"] = (str, Field(description="own, impersonation, delegation or app"))
    fields["mailboxes"] = (int, Field(0, description="mailboxes on this profile"))
    return fields


ProfileOut: type[BaseModel] = create_model(
    "ProfileOut", __base__=Out, **_profile_fields())


def profile_out(profile: Profile, mailboxes: int) -> dict[str, Any]:
    from serversync.core.rules import access_mode
    data = profile_to_spec(profile)
    for name in PROFILE_SECRETS:
        data[name] = secret_state(getattr(profile, name))
    data.update(id=profile.id, access=access_mode(profile).value, mailboxes=mailboxes)
    return data


class ReachOut(Out):
    profile: str
    uses_service_account: bool
    access: str
    mailboxes: int
    scope: list[str]
    warning: str = Field("", description="the seed's warning, when one account opens many")


class ChannelOut(Out):
    method: str
    enabled: bool
    status: str


class MailboxOut(Out):
    address: str
    name: str
    profile: str
    owner: str
    owner_kind: str
    incoming: ChannelOut
    outgoing: ChannelOut
    act: ChannelOut
    allow_credentials: bool
    username: str | None
    secret: SecretState
    approval: str
    process_email_from: dt.datetime | None
    after_processing: str
    after_processing_folder: str | None
    tracking_rule: str
    folders: list[str]
    track_sent: bool
    last_tested_at: dt.datetime | None
    id: int | None


def mailbox_out(mailbox: Mailbox) -> MailboxOut:
    data = plain(dataclasses.replace(mailbox, secret=None))
    data["secret"] = secret_state(mailbox.secret)
    return MailboxOut.model_validate(data)


class SignInErrorOut(Out):
    code: str
    message: str
    fix: str


class SignInStartOut(Out):
    """What to show the user: open ``verification_uri``, type ``user_code``."""

    mailbox: str
    status: str
    user_code: str
    verification_uri: str
    message: str = Field(description="Microsoft's own instructions for the user")
    expires_at: dt.datetime


class SignInOut(Out):
    """A sign-in's state. The user code and message are given only while it is pending
    (useless afterwards); the device code and the tokens are never given."""

    mailbox: str
    status: str
    user_code: str | None
    verification_uri: str
    message: str
    expires_at: dt.datetime
    started_at: dt.datetime
    started_by: str
    finished_at: dt.datetime | None
    signed_in_as: str | None
    error: SignInErrorOut | None


def sign_in_start_out(state: SignIn) -> SignInStartOut:
    return SignInStartOut(mailbox=state.mailbox, status=state.status.value,
                          user_code=state.user_code, verification_uri=state.verification_uri,
                          message=state.message, expires_at=state.expires_at)


def sign_in_out(state: SignIn) -> SignInOut:
    pending = state.status is SignInStatus.PENDING
    return SignInOut(
        mailbox=state.mailbox, status=state.status.value,
        user_code=state.user_code if pending else None,
        verification_uri=state.verification_uri, message=state.message if pending else "",
        expires_at=state.expires_at, started_at=state.started_at, started_by=state.started_by,
        finished_at=state.finished_at, signed_in_as=state.signed_in_as,
        error=SignInErrorOut(code=state.error_code, message=state.error_message,
                             fix=state.error_fix) if state.error_code else None)


class ResultOut(Out):
    channel: str
    ok: bool
    summary: str
    code: str
    fix: str


class TestReportOut(Out):
    mailbox: str
    ok: bool
    results: list[ResultOut]


def report_out(report: TestReport) -> TestReportOut:
    def one(r: ChannelResult) -> ResultOut:
        return ResultOut(channel=r.channel.value, ok=r.ok, summary=r.summary, code=r.code,
                         fix=r.fix)
    return TestReportOut(mailbox=report.mailbox, ok=report.ok,
                         results=[one(r) for r in report.results])


class PartyOut(Out):
    kind: str
    key: str
    name: str
    emails: list[str]
    tracking_rule: str
    id: int | None


def party_out(party: Party) -> PartyOut:
    return PartyOut.model_validate(plain(party))


class AlertOut(Out):
    id: int | None
    severity: str
    code: str
    message: str
    fix: str
    mailbox: str | None
    profile: str | None
    channel: str | None
    created_at: dt.datetime


def alert_out(alert: Alert) -> AlertOut:
    return AlertOut.model_validate(plain(alert))


class RunOut(Out):
    id: int
    mailbox: str
    channel: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    seconds: float | None
    items: int
    failures: int
    outcome: str | None
    error_code: str | None
    error: str | None
    detail: str
    worker: str


def run_out(run: Run) -> RunOut:
    return RunOut.model_validate({**plain(run), "seconds": run.seconds})


class ScheduleOut(Out):
    mailbox: str
    channel: str
    profile: str
    enabled: bool
    status: str
    next_run_at: dt.datetime | None
    last_run_at: dt.datetime | None
    last_success_at: dt.datetime | None
    last_error_code: str | None
    last_error: str | None
    consecutive_failures: int
    backoff_until: dt.datetime | None
    requested_at: dt.datetime | None
    running_since: dt.datetime | None
    why: str


def schedule_out(schedule: ChannelSchedule) -> ScheduleOut:
    return ScheduleOut.model_validate(plain(schedule))


class RecipientOut(Out):
    role: str
    address: str
    name: str
    party_kind: str | None
    party_key: str | None


class AttachmentOut(Out):
    position: int
    name: str
    content_type: str
    size: int
    stored: bool
    content_id: str | None
    notice: str


class RegardingOut(Out):
    kind: str
    key: str


class EmailOut(Out):
    id: int | None
    direction: str
    status: str
    subject: str
    sender: str
    recipients: list[RecipientOut]
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    conversation_id: str | None
    tracking_token: str | None
    sent_at: dt.datetime | None
    received_at: dt.datetime | None
    body_text: str | None = Field(None, description="only when one activity is read")
    body_html: str | None = Field(None, description="sanitized; only when one activity is read")
    attachments: list[AttachmentOut]
    owner_kind: str | None
    owner: str | None
    regarding: RegardingOut | None
    correlated_to: int | None
    correlation: str
    sender_mailbox: str | None
    notices: list[str]
    created_at: dt.datetime


def email_out(activity: EmailActivity, *, bodies: bool) -> EmailOut:
    data = plain(dataclasses.replace(activity, attachments=()))
    data["attachments"] = [
        {"position": i, "name": a.name, "content_type": a.content_type, "size": a.size,
         "stored": a.content is not None or not a.notice, "content_id": a.content_id,
         "notice": a.notice} for i, a in enumerate(activity.attachments)]
    if not bodies:
        data["body_text"] = data["body_html"] = None
    return EmailOut.model_validate(data)


class TokenOut(Out):
    name: str
    role: Role
    prefix: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class NewTokenOut(TokenOut):
    token: str = Field(description="the token itself: shown this once, never again")


def token_out(token: ApiToken) -> dict[str, Any]:
    data: dict[str, Any] = plain(token)
    data.pop("id", None)
    return data


class WebhookOut(Out):
    id: int | None
    url: str
    events: list[Event]
    secret: SecretState
    active: bool
    description: str
    created_at: dt.datetime


class NewWebhookOut(WebhookOut):
    generated_secret: str | None = Field(
        None, description="the signing secret the server generated: shown this once")


def webhook_out(hook: Webhook) -> dict[str, Any]:
    data: dict[str, Any] = plain(dataclasses.replace(hook, secret=None))
    data["secret"] = secret_state(hook.secret)
    return data


class DeliveryOut(Out):
    id: int | None
    webhook_id: int
    event: str
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str
    response_status: int | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None


def delivery_out(delivery: Delivery) -> DeliveryOut:
    return DeliveryOut.model_validate(plain(delivery))


class HeadlineOut(Out):
    subject: str
    sender: str
    to: str
    date: str
    message_id: str | None


class QuarantinedOut(Out):
    """A quarantined incoming message (its raw bytes at ``.../raw``)."""

    id: int
    mailbox: str
    folder: str
    remote_id: str
    size: int
    code: str = Field(description="why: unparseable, store-refused, loop-guard, ...")
    reason: str
    created_at: dt.datetime
    sent: bool | None = Field(description="read from the Sent folder (null: not recorded)")
    retries: int
    retried_at: dt.datetime | None
    released_at: dt.datetime | None
    released_by: str | None
    outcome: str | None = Field(description="how it left the quarantine: tracked, linked, "
                                            "skipped or discarded; null while in it")
    email_id: int | None = Field(None, description="the email activity it became")
    headline: HeadlineOut | None = Field(None, description="a few headers (single message)")


def quarantined_out(message: QuarantinedMessage) -> QuarantinedOut:
    return QuarantinedOut.model_validate(plain(message))


class RetryOut(Out):
    id: int
    mailbox: str
    outcome: str = Field(description="tracked, linked or skipped (released), or quarantined "
                                     "(failed again: see code and reason)")
    released: bool
    email_id: int | None
    code: str
    reason: str


def retry_out(result: RetryResult) -> RetryOut:
    return RetryOut.model_validate({**plain(result), "released": result.released})
