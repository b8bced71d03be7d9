"""The declarative configuration: profiles, mailboxes, the directory and org settings.

`serversync apply -f config.yaml`, the CLI's create/update commands and the REST API all
validate their input through these pydantic models, so a bad field gets the same one-line
error everywhere (``profiles[0].incoming.port: Input should be less than or equal to
65535``). Unknown fields are errors, never silently ignored. Secrets may be written as
``{env: NAME}`` or ``{file: PATH}`` so that the file itself holds none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serversync.connectors import certificates
from serversync.core import rules
from serversync.core.errors import AuthError, ConfigError
from serversync.core.model import (
    AfterProcessing,
    ApprovalStatus,
    ChannelState,
    CredentialSource,
    Endpoint,
    ImpersonationMethod,
    Mailbox,
    OrgSettings,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
    TlsMode,
    TrackingRule,
)
from serversync.core.secret import Secret
from serversync.core.times import utc as _utc


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class EnvRef(Spec):
    env: str


class FileRef(Spec):
    file: str


SecretInput = str | EnvRef | FileRef


def resolve_secret(value: SecretInput | None, field: str) -> Secret | None:
    """Read a secret from where the config says it is; never echo its value."""
    if value is None:
        return None
    if isinstance(value, EnvRef):
        found = os.environ.get(value.env)
        if not found:
            raise ConfigError(field, f"environment variable {value.env} is not set",
                              fix=f"export {value.env}=... before running the command")
        return Secret(found)
    if isinstance(value, FileRef):
        try:
            return Secret(Path(value.file).read_text().rstrip("\r\n"))
        except OSError as exc:
            raise ConfigError(field, f"cannot read secret file {value.file} ({exc.strerror})"
                              ) from None
    if not value:
        raise ConfigError(field, "is empty")
    return Secret(value)


class EndpointSpec(Spec):
    host: Annotated[str, Field(min_length=1, max_length=255)]
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: TlsMode = TlsMode.IMPLICIT

    def to_core(self) -> Endpoint:
        return Endpoint(self.host, self.port, self.tls)


class ProfileSpec(Spec):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    kind: ServerKind
    description: str = ""
    incoming: EndpointSpec | None = None
    outgoing: EndpointSpec | None = None
    credential_source: CredentialSource = CredentialSource.MAILBOX
    service_user: str | None = None
    service_secret: SecretInput | None = None
    use_impersonation: bool = False
    impersonation_method: ImpersonationMethod = ImpersonationMethod.AUTHZID
    use_same_settings_for_outgoing: bool = True
    outgoing_credential_source: CredentialSource | None = None
    outgoing_service_user: str | None = None
    outgoing_service_secret: SecretInput | None = None
    allow_plaintext: bool = False
    ca_file: str | None = None
    dav_url: str | None = None
    ews_url: str | None = None
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretInput | None = None
    client_certificate: SecretInput | None = None  # PEM certificate + key (exchange-online)
    token_url: str | None = None
    api_url: str | None = None
    shared_namespace: str = "shared/{user}/"
    process_email_from: dt.datetime | None = None
    min_polling_interval_s: Annotated[int, Field(ge=0, le=86400)] = 60
    max_concurrent_connections: Annotated[int, Field(ge=1, le=rules.MAX_CONNECTIONS)] = 10
    move_failed_to_folder: str | None = None
    send_alert_email: bool = False
    alert_owner: str | None = None
    connection_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    impersonation_scope: list[str] = Field(default_factory=list)
    conflict_policy: Literal["application-wins", "server-wins", "newest-wins"] = (
        "application-wins")
    remove_unfiltered: bool = False

    @field_validator("impersonation_scope")
    @classmethod
    def _scope(cls, value: list[str]) -> list[str]:
        try:
            return [rules.check_scope_entry("", v) for v in value]
        except ConfigError as exc:
            raise ValueError(exc.message.lstrip(": ")) from None

    def to_core(self, existing: Profile | None = None) -> Profile:
        """The profile this spec describes; secrets left out keep their stored values.

        The app credential is one of two (``client_secret`` or ``client_certificate``):
        giving one replaces the stored other, so switching needs no way to erase a secret.
        """
        def secret(name: str, *, replaced_by: str | None = None) -> Secret | None:
            given = resolve_secret(getattr(self, name), name)
            if given is None and existing is not None and (
                    replaced_by is None or getattr(self, replaced_by) is None):
                return getattr(existing, name)  # type: ignore[no-any-return]
            return given
        values: dict[str, Any] = {f: getattr(self, f) for f in type(self).model_fields}
        values.update(
            incoming=self.incoming.to_core() if self.incoming else None,
            outgoing=self.outgoing.to_core() if self.outgoing else None,
            service_secret=secret("service_secret"),
            outgoing_service_secret=secret("outgoing_service_secret"),
            client_secret=secret("client_secret", replaced_by="client_certificate"),
            client_certificate=secret("client_certificate", replaced_by="client_secret"),
            impersonation_scope=tuple(self.impersonation_scope),
            process_email_from=_utc(self.process_email_from),
            id=existing.id if existing else None)
        profile = Profile(**values)
        rules.validate_profile(profile)
        if self.client_certificate is not None and profile.client_certificate:
            _check_certificate(profile.client_certificate)
        return profile


def _check_certificate(pem: Secret) -> None:
    """A newly given certificate must be usable now: readable, with its key, in validity."""
    try:
        certificates.load(pem.reveal()).check_valid()
    except AuthError as exc:  # expired or not yet valid: refuse to store it
        raise ConfigError("client_certificate", exc.message, fix=exc.fix) from None


def profile_to_spec(profile: Profile) -> dict[str, Any]:
    """A profile as spec fields (secrets left out), for `update` and `show`."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(Profile):
        value = getattr(profile, f.name)
        if f.name == "id" or isinstance(value, Secret) or value is None:
            continue
        if isinstance(value, Endpoint):
            value = {"host": value.host, "port": value.port, "tls": value.tls.value}
        elif isinstance(value, tuple):
            value = list(value)
        data[f.name] = value
    return data


class MailboxSpec(Spec):
    address: Annotated[str, Field(min_length=3, max_length=320)]
    profile: str
    owner: Annotated[str, Field(min_length=1)]
    owner_kind: Literal["user", "queue"] = "user"
    name: str = ""
    incoming: SyncMethod = SyncMethod.NONE
    outgoing: SyncMethod = SyncMethod.NONE
    act: SyncMethod = SyncMethod.NONE
    allow_credentials: bool = False
    username: str | None = None
    secret: SecretInput | None = None
    approval: ApprovalStatus | None = None  # None keeps the stored value
    process_email_from: dt.datetime | None = None
    after_processing: AfterProcessing = AfterProcessing.LEAVE
    after_processing_folder: str | None = None
    tracking_rule: TrackingRule = TrackingRule.REPLIES
    folders: list[str] = Field(default_factory=lambda: ["INBOX"])
    track_sent: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return rules.check_address("", value)
        except ConfigError as exc:
            raise ValueError(exc.message.lstrip(": ")) from None

    def to_core(self, existing: Mailbox | None = None) -> Mailbox:
        """The mailbox this spec describes, keeping status, enablement and unspecified secrets."""
        def channel(method: SyncMethod, old: ChannelState | None) -> ChannelState:
            if old is None or method is SyncMethod.NONE:
                return ChannelState(method)
            # Changing nothing keeps the channel's health; a new method needs a new test.
            return old if old.method is method else ChannelState(method)
        secret = resolve_secret(self.secret, "secret")
        if secret is None and existing is not None:
            secret = existing.secret
        approval = self.approval or (existing.approval if existing else ApprovalStatus.EMPTY)
        return Mailbox(
            address=self.address, owner_kind=PartyKind(self.owner_kind), owner=self.owner,
            profile=self.profile, name=self.name,
            incoming=channel(self.incoming, existing.incoming if existing else None),
            outgoing=channel(self.outgoing, existing.outgoing if existing else None),
            act=channel(self.act, existing.act if existing else None),
            allow_credentials=self.allow_credentials, username=self.username, secret=secret,
            approval=approval, process_email_from=_utc(self.process_email_from),
            after_processing=self.after_processing,
            after_processing_folder=self.after_processing_folder,
            tracking_rule=self.tracking_rule, folders=tuple(self.folders),
            track_sent=self.track_sent,
            last_tested_at=existing.last_tested_at if existing else None,
            id=existing.id if existing else None)


def mailbox_to_spec(mailbox: Mailbox) -> dict[str, Any]:
    return {
        "address": mailbox.address, "profile": mailbox.profile, "owner": mailbox.owner,
        "owner_kind": mailbox.owner_kind.value, "name": mailbox.name,
        "incoming": mailbox.incoming.method.value, "outgoing": mailbox.outgoing.method.value,
        "act": mailbox.act.method.value, "allow_credentials": mailbox.allow_credentials,
        "username": mailbox.username, "approval": mailbox.approval.value,
        "process_email_from": mailbox.process_email_from,
        "after_processing": mailbox.after_processing.value,
        "after_processing_folder": mailbox.after_processing_folder,
        "tracking_rule": mailbox.tracking_rule.value, "folders": list(mailbox.folders),
        "track_sent": mailbox.track_sent}


class PartySpec(Spec):
    kind: PartyKind
    key: Annotated[str, Field(min_length=1, max_length=255)]
    name: str = ""
    emails: list[str] = Field(default_factory=list)
    tracking_rule: TrackingRule = TrackingRule.REPLIES

    @field_validator("emails")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        out = []
        for i, address in enumerate(value):
            try:
                out.append(rules.check_address("", address))
            except ConfigError as exc:
                raise ValueError(f"emails[{i}]: {exc.message.lstrip(': ')}") from None
        return out

    def to_core(self) -> Party:
        return Party(self.kind, self.key, self.name or self.key, tuple(self.emails),
                     self.tracking_rule)


class SettingsSpec(Spec):
    process_only_approved_mailboxes: bool = True
    tracking_token_prefix: Annotated[str, Field(min_length=1, max_length=20)] = "SSY"
    use_tracking_tokens: bool = True
    use_smart_matching: bool = False
    keep_raw_messages: bool = True
    max_attachment_bytes: Annotated[int, Field(ge=0)] = 25 * 1024 * 1024

    def to_core(self) -> OrgSettings:
        return OrgSettings(**self.model_dump())


class Manifest(Spec):
    """The whole declarative configuration (`serversync apply -f`)."""

    settings: SettingsSpec | None = None
    directory: list[PartySpec] = Field(default_factory=list)
    profiles: list[ProfileSpec] = Field(default_factory=list)
    mailboxes: list[MailboxSpec] = Field(default_factory=list)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "EnvRef", "FileRef", "function-after[_scope(), list[str]]"):
            continue  # pydantic's union-branch labels are noise to a reader
        else:
            out += f".{part}" if out else str(part)
    return out


def config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    """The first validation problem as one line that names the field."""
    first = exc.errors()[0]
    field = _path(tuple(first["loc"]))
    if prefix:
        field = f"{prefix}.{field}" if field else prefix
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "is required"
    return ConfigError(field, message.removeprefix("Value error, "))


def validate(model: type[Spec], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, prefix) from None


def load_manifest(path: Path) -> Manifest:
    """Read a YAML (or JSON) config file into a validated `Manifest`."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"is not valid YAML{where}: "
                          f"{getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a mapping with profiles, mailboxes, directory")
    manifest: Manifest = validate(Manifest, data)
    return manifest
