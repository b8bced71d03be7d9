"""The seed's rules, enforced in code.

The seed document fixes how an email server profile's credentials reach its mailboxes:

* credentials in the profile: one service account reaches every mailbox, *as* each user
  with Use Impersonation = Yes, or as a *delegate* with No;
* credentials from the user or queue: each mailbox carries its own user name and secret and
  may use them only with Allow to Use Credentials for Email Processing = Yes;
* Use same settings for Outgoing: outgoing authenticates exactly like incoming;
* delegation (Use Impersonation = No) does not sync appointments, contacts and tasks;
* the Exchange Online profile authenticates server to server (app-only OAuth).

To these we add what a demanding administrator expects: an impersonation scope that limits
the blast radius of a service account, and "only approved mailboxes are processed".

Every function here is pure. Each violation is a `RuleViolation` or `ConfigError` whose
message names the profile, mailbox or field and whose ``fix`` says what to change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from serversync.core.errors import ConfigError, RuleViolation, SyncError
from serversync.core.model import (
    AccessMode,
    AfterProcessing,
    ApprovalStatus,
    Channel,
    CredentialSource,
    Endpoint,
    ImpersonationMethod,
    Mailbox,
    OrgSettings,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
    TlsMode,
)
from serversync.core.secret import Secret

MAX_CONNECTIONS = 300
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DOMAIN = re.compile(r"^@?([a-z0-9-]+\.)+[a-z0-9-]+$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Login:
    """Exactly how to authenticate one connection to one mailbox.

    ``user`` is the authentication identity (authcid) sent to the server and ``authzid`` the
    identity to act as, when impersonating with SASL PLAIN. ``target`` is the mailbox's
    address; for delegation the connection logs in as the delegate and opens ``target``
    through the server's shared namespace (IMAP) or sends on its behalf (SMTP).
    """

    mode: AccessMode
    user: str
    secret: Secret | None
    target: str
    authzid: str | None = None
    service: str | None = None  # the service account's own name (impersonation, delegation)

    @property
    def acts_as_target(self) -> bool:
        return self.mode in (AccessMode.OWN, AccessMode.IMPERSONATION)


# ---------------------------------------------------------------- addresses and scope

def normalize_address(address: str) -> str:
    """Lower-cased, trimmed; the comparison form for every address in the system."""
    return address.strip().lower()


def check_address(field: str, address: str) -> str:
    value = normalize_address(address)
    if not _ADDRESS.match(value):
        raise ConfigError(field, f"{address!r} is not an email address",
                          fix="use the form user@example.com")
    return value


def check_scope_entry(field: str, entry: str) -> str:
    value = normalize_address(entry)
    if _ADDRESS.match(value):
        return value
    if _DOMAIN.match(value):
        return value if value.startswith("@") else "@" + value
    raise ConfigError(field, f"{entry!r} is neither an address nor a domain",
                      fix="list domains such as example.com or addresses such as ceo@example.com")


def in_scope(profile: Profile, address: str) -> bool:
    """Whether the profile's service account may reach ``address``.

    An empty scope is unrestricted (the UI warns about it). A domain entry matches that
    exact domain only, not its subdomains: a scope should be read literally.
    """
    if not profile.impersonation_scope:
        return True
    value = normalize_address(address)
    domain = "@" + value.rpartition("@")[2]
    return any(entry in (value, domain) for entry in profile.impersonation_scope)


def uses_service_account(profile: Profile) -> bool:
    return profile.credential_source in (CredentialSource.PROFILE, CredentialSource.APP)


def check_scope(profile: Profile, mailbox: Mailbox) -> None:
    if uses_service_account(profile) and not in_scope(profile, mailbox.address):
        scope = ", ".join(profile.impersonation_scope)
        raise RuleViolation(
            f"mailbox {mailbox.address} is outside the impersonation scope of profile "
            f"{profile.name!r} ({scope}); its service account is refused there",
            fix=f"add the mailbox's domain or address to the impersonation scope of "
                f"{profile.name!r}, or move the mailbox to a profile that covers it",
            code="outside-scope")


# ---------------------------------------------------------------- access modes

def access_mode(profile: Profile) -> AccessMode:
    """The seed's table: credential source plus Use Impersonation decide the access mode."""
    if profile.credential_source is CredentialSource.APP:
        return AccessMode.APP
    if profile.credential_source is CredentialSource.MAILBOX:
        return AccessMode.OWN
    return AccessMode.IMPERSONATION if profile.use_impersonation else AccessMode.DELEGATION


def _target_user(mailbox: Mailbox) -> str:
    return mailbox.username or mailbox.address


def login_for(profile: Profile, mailbox: Mailbox, channel: Channel) -> Login:
    """How ``channel`` of ``mailbox`` authenticates, after every rule has been checked.

    With Use same settings for Outgoing = Yes the outgoing channel authenticates exactly like
    the incoming one (the same call, the same answer); otherwise the profile's outgoing
    credentials apply.
    """
    check_credentials(profile, mailbox)
    check_scope(profile, mailbox)
    source, user, secret = profile.credential_source, profile.service_user, profile.service_secret
    if channel is Channel.OUTGOING and not profile.use_same_settings_for_outgoing:
        source = profile.outgoing_credential_source or source
        user = profile.outgoing_service_user or user
        secret = profile.outgoing_service_secret or secret
    if source is CredentialSource.MAILBOX:
        return Login(AccessMode.OWN, _target_user(mailbox), mailbox.secret, mailbox.address)
    if source is CredentialSource.APP:
        return Login(AccessMode.APP, profile.client_id or "", profile.client_secret,
                     mailbox.address)
    assert user is not None
    if not profile.use_impersonation:
        return Login(AccessMode.DELEGATION, user, secret, mailbox.address, service=user)
    target = _target_user(mailbox)
    if profile.impersonation_method is ImpersonationMethod.MASTER_USER:
        return Login(AccessMode.IMPERSONATION, f"{target}*{user}", secret, mailbox.address,
                     service=user)
    return Login(AccessMode.IMPERSONATION, user, secret, mailbox.address, authzid=target,
                 service=user)


# ---------------------------------------------------------------- profile validation

def _check_endpoint(field: str, endpoint: Endpoint, allow_plaintext: bool) -> None:
    if not endpoint.host.strip():
        raise ConfigError(f"{field}.host", "is empty", fix="give the server's host name")
    if not 1 <= endpoint.port <= 65535:
        raise ConfigError(f"{field}.port", f"{endpoint.port} is not a TCP port (1-65535)")
    if endpoint.tls is TlsMode.NONE and not allow_plaintext:
        raise ConfigError(
            f"{field}.tls", "'none' sends passwords and mail unencrypted",
            fix="use implicit or starttls; if the network is trusted, set "
                "allow_plaintext: true on the profile to opt in explicitly")


def _check_app_credentials(profile: Profile) -> None:
    """tenant_id (Exchange Online), client_id, and exactly one client credential.

    Microsoft's identity platform accepts a client secret or a certificate (a signed client
    assertion); sending both is ambiguous, so a profile holds one or the other.
    """
    online = profile.kind is ServerKind.EXCHANGE_ONLINE
    if online and not profile.tenant_id:
        raise ConfigError("tenant_id", "is required for app (server-to-server) credentials")
    if not profile.client_id:
        raise ConfigError("client_id", "is required for app (server-to-server) credentials")
    has_secret, has_certificate = bool(profile.client_secret), bool(profile.client_certificate)
    if online and has_secret and has_certificate:
        raise ConfigError("client_certificate", "give either client_secret or "
                          "client_certificate, not both",
                          fix="remove one of them (the certificate is the stronger credential)")
    if not has_secret and not (online and has_certificate):
        raise ConfigError("client_secret",
                          "is required for app (server-to-server) credentials"
                          + (" (or client_certificate)" if online else ""))


def validate_profile(profile: Profile) -> None:
    """Raise the first problem with a profile on its own (mailboxes are checked separately)."""
    if not profile.name.strip():
        raise ConfigError("name", "is empty")
    if not 1 <= profile.max_concurrent_connections <= MAX_CONNECTIONS:
        raise ConfigError("max_concurrent_connections",
                          f"{profile.max_concurrent_connections} is outside 1-{MAX_CONNECTIONS}")
    if not 0 < profile.connection_timeout_s <= 600:
        raise ConfigError("connection_timeout_s", "must be between 0 and 600 seconds")
    if not 0 <= profile.min_polling_interval_s <= 86400:
        raise ConfigError("min_polling_interval_s", "must be between 0 and 86400 seconds")
    for i, entry in enumerate(profile.impersonation_scope):
        check_scope_entry(f"impersonation_scope[{i}]", entry)
    if profile.kind in (ServerKind.IMAP, ServerKind.POP3, ServerKind.GMAIL):
        if profile.incoming is None:
            raise ConfigError("incoming", f"a {profile.kind} profile needs an incoming server")
    for name in ("incoming", "outgoing"):
        endpoint = getattr(profile, name)
        if endpoint is not None:
            _check_endpoint(name, endpoint, profile.allow_plaintext)
    if profile.dav_url and profile.dav_url.startswith("http://") and not profile.allow_plaintext:
        raise ConfigError("dav_url", "plain http sends passwords unencrypted",
                          fix="use https, or set allow_plaintext: true to opt in explicitly")

    source = profile.credential_source
    if profile.kind is ServerKind.EXCHANGE_ONLINE:
        if source is CredentialSource.PROFILE:
            raise RuleViolation(
                f"profile {profile.name!r}: Exchange Online has no service account with "
                "impersonation (Microsoft removed ApplicationImpersonation); credential source "
                "'profile' is not supported",
                fix="set credential_source: app with tenant_id, client_id and client_secret "
                    "(or client_certificate), or credential_source: mailbox for each user's "
                    "own consent (serversync mailbox sign-in)", code="app-only")
        if source is CredentialSource.MAILBOX:
            # Delegated OAuth: each mailbox's secret is its user's refresh token, issued to
            # this app registration by the user's own sign-in (DESIGN.md, per-mailbox row).
            if not profile.tenant_id:
                raise ConfigError("tenant_id", "is required for Exchange Online sign-in")
            if not profile.client_id:
                raise ConfigError("client_id", "is required for Exchange Online sign-in (the "
                                  "app registration users consent to)")
        if profile.service_secret is not None or profile.service_user:
            raise RuleViolation(
                f"profile {profile.name!r}: an Exchange Online profile has no service account "
                "password; remove service_user and service_secret",
                fix="use the app registration's client_id and client_secret (or "
                    "client_certificate)", code="app-only")
    if profile.client_certificate and (
            profile.kind is not ServerKind.EXCHANGE_ONLINE or source is not CredentialSource.APP):
        raise ConfigError("client_certificate",
                          "is only used by exchange-online profiles with credential_source: app",
                          fix="remove it (a Gmail service account's key goes in client_secret)")
    if source is CredentialSource.APP:
        if profile.kind not in (ServerKind.EXCHANGE_ONLINE, ServerKind.GMAIL):
            raise ConfigError("credential_source",
                              f"'app' is for exchange-online and gmail, not {profile.kind}")
        _check_app_credentials(profile)
    if source is CredentialSource.PROFILE:
        if not profile.service_user:
            raise ConfigError("service_user", "is required when credentials are in the profile")
        if profile.service_secret is None:
            raise ConfigError("service_secret",
                              "is required when credentials are in the profile",
                              fix="give the service account's password (or an env: reference)")
    if source is CredentialSource.MAILBOX and profile.use_impersonation:
        raise ConfigError(
            "use_impersonation",
            "impersonation needs a service account, but credentials come from each mailbox",
            fix="set credential_source: profile with a service account, or use_impersonation: false")
    if source is not CredentialSource.PROFILE and (profile.service_user or profile.service_secret):
        raise ConfigError("service_user",
                          f"a service account is only used with credential_source: profile "
                          f"(this profile uses {source.value!r})")
    if profile.use_same_settings_for_outgoing:
        if (profile.outgoing_credential_source or profile.outgoing_service_user
                or profile.outgoing_service_secret):
            raise ConfigError(
                "outgoing_credential_source",
                "separate outgoing credentials are ignored while use_same_settings_for_outgoing "
                "is on", fix="remove them, or set use_same_settings_for_outgoing: false")
    elif profile.outgoing_credential_source is CredentialSource.PROFILE and not (
            (profile.outgoing_service_user or profile.service_user)
            and (profile.outgoing_service_secret or profile.service_secret)):
        raise ConfigError("outgoing_service_user",
                          "outgoing credentials from the profile need a user name and secret")


# ---------------------------------------------------------------- mailbox rules

def check_credentials(profile: Profile, mailbox: Mailbox) -> None:
    """Per-mailbox credentials need Allow to Use Credentials = Yes and both values."""
    needs_own = profile.credential_source is CredentialSource.MAILBOX or (
        not profile.use_same_settings_for_outgoing
        and profile.outgoing_credential_source is CredentialSource.MAILBOX
        and mailbox.outgoing.method is SyncMethod.SERVER_SIDE)
    if not needs_own:
        if profile.kind is ServerKind.EXCHANGE_ONLINE and (mailbox.secret or mailbox.username):
            raise RuleViolation(
                f"mailbox {mailbox.address}: Exchange Online uses app-only access; "
                "per-mailbox user names and passwords do not apply",
                fix="remove username and secret from the mailbox", code="app-only")
        return
    if not mailbox.allow_credentials:
        raise RuleViolation(
            f"mailbox {mailbox.address}: profile {profile.name!r} takes credentials from each "
            "mailbox, but Allow to Use Credentials for Email Processing is off",
            fix="set allow_credentials: true on the mailbox (with its user name and password)",
            code="credentials-not-allowed")
    if not (mailbox.username or mailbox.address) or mailbox.secret is None:
        if profile.kind is ServerKind.EXCHANGE_ONLINE:
            raise RuleViolation(
                f"mailbox {mailbox.address}: the user has not signed in (no refresh token is "
                "stored)", fix=f"run: serversync mailbox sign-in {mailbox.address}",
                code="credentials-missing")
        raise RuleViolation(
            f"mailbox {mailbox.address}: no password is stored for per-mailbox credentials",
            fix="set the mailbox's username and secret", code="credentials-missing")


def act_problem(profile: Profile, mailbox: Mailbox) -> RuleViolation | None:
    """Why appointments, contacts and tasks cannot sync for this mailbox, if they cannot."""
    if access_mode(profile) is AccessMode.DELEGATION:
        return RuleViolation(
            f"mailbox {mailbox.address}: profile {profile.name!r} uses delegation "
            "(Use Impersonation = No), which does not support syncing appointments, contacts "
            "and tasks",
            fix="set use_impersonation: true on the profile, use per-mailbox credentials, "
                "or set the mailbox's ACT method to none",
            code="act-on-delegation")
    if not profile.kind.supports_act:
        return RuleViolation(
            f"mailbox {mailbox.address}: {profile.kind} servers carry mail only",
            fix="set the mailbox's ACT method to none", code="act-unsupported")
    if profile.kind is ServerKind.IMAP and not profile.dav_url:
        return RuleViolation(
            f"mailbox {mailbox.address}: profile {profile.name!r} has no dav_url, so there is "
            "no calendar or address book server",
            fix="set dav_url on the profile (the CalDAV/CardDAV root) or the ACT method to none",
            code="act-unsupported")
    if mailbox.is_queue:
        return RuleViolation(
            f"mailbox {mailbox.address}: queue mailboxes do not sync appointments, contacts "
            "and tasks", fix="set the mailbox's ACT method to none", code="act-unsupported")
    return None


def validate_mailbox(profile: Profile, mailbox: Mailbox) -> None:
    """Raise the first problem with a mailbox on its profile."""
    check_address("address", mailbox.address)
    if mailbox.owner_kind not in (PartyKind.USER, PartyKind.QUEUE):
        raise ConfigError("owner_kind", "a mailbox belongs to a user or a queue")
    if mailbox.after_processing is AfterProcessing.DELETE and not mailbox.is_queue:
        raise ConfigError("after_processing",
                          "delete after processing is only for queue mailboxes",
                          fix="use leave, flag or move for a user's mailbox")
    if mailbox.after_processing is AfterProcessing.MOVE and not mailbox.after_processing_folder:
        raise ConfigError("after_processing_folder", "is required to move processed mail")
    if not mailbox.folders:
        raise ConfigError("folders", "list at least one folder (INBOX)")
    if profile.kind is ServerKind.POP3 and mailbox.folders != ("INBOX",):
        raise ConfigError("folders", "POP3 has only the INBOX")
    if mailbox.act.method is SyncMethod.SERVER_SIDE:
        problem = act_problem(profile, mailbox)
        if problem is not None:
            raise problem
    check_scope(profile, mailbox)
    # Per-mailbox credentials may be completed later; they are required at enable time.
    if profile.kind is ServerKind.EXCHANGE_ONLINE and (mailbox.secret or mailbox.username):
        check_credentials(profile, mailbox)


def delegation_conflicts(profile: Profile, mailboxes: Iterable[Mailbox]) -> None:
    """Refuse a profile change that would leave ACT-enabled mailboxes on delegation."""
    if access_mode(profile) is not AccessMode.DELEGATION:
        return
    names = sorted(m.address for m in mailboxes if m.act.method is SyncMethod.SERVER_SIDE)
    if names:
        raise RuleViolation(
            f"profile {profile.name!r} cannot use delegation (Use Impersonation = No): "
            f"delegation does not sync appointments, contacts and tasks, and these mailboxes "
            f"sync them: {', '.join(names)}",
            fix="set those mailboxes' ACT method to none first, or keep use_impersonation: true",
            code="act-on-delegation")


def check_approved(settings: OrgSettings, mailbox: Mailbox) -> None:
    if settings.process_only_approved_mailboxes and mailbox.approval is not ApprovalStatus.APPROVED:
        raise RuleViolation(
            f"mailbox {mailbox.address} is not approved (approval: {mailbox.approval.value}); "
            "only approved mailboxes are processed",
            fix=f"approve it: serversync mailbox approve {mailbox.address}",
            code="not-approved")


def enable_problems(settings: OrgSettings, profile: Profile, mailbox: Mailbox,
                    channel: Channel) -> SyncError | None:
    """The first rule that stops ``channel`` being enabled, before any connection is made."""
    try:
        check_approved(settings, mailbox)
        check_credentials(profile, mailbox)
        check_scope(profile, mailbox)
    except SyncError as exc:
        return exc
    if channel is Channel.ACT:
        return act_problem(profile, mailbox)
    if channel is Channel.OUTGOING and profile.kind in (ServerKind.IMAP, ServerKind.POP3,
                                                        ServerKind.GMAIL):
        if profile.outgoing is None:
            return RuleViolation(f"profile {profile.name!r} has no outgoing (SMTP) server",
                                 fix="set outgoing host and port on the profile",
                                 code="no-outgoing-server")
    return None
