"""The domain model: email server profiles, mailboxes, the directory and alerts.

These are plain frozen dataclasses with no I/O. The field names follow the reference
system's vocabulary (an *email server profile* holds the connection settings for many
*mailboxes*; a mailbox belongs to a *user* or a *queue*), and every enum value is the word an
administrator types in a config file. The store maps rows to these types and back; the web
API and the config file validate into them. Rules that span several fields live in
`core.rules`, not here, so that each rule has one home and one test.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

from serversync.core.secret import Secret


class ServerKind(enum.StrEnum):
    """What is on the other end of a profile."""

    IMAP = "imap"
    POP3 = "pop3"
    EXCHANGE = "exchange"  # Exchange Server on-premises, EWS
    EXCHANGE_ONLINE = "exchange-online"  # Microsoft 365, Microsoft Graph
    GMAIL = "gmail"  # Google Workspace: IMAP/SMTP with XOAUTH2

    @property
    def supports_act(self) -> bool:
        """POP3 and IMAP servers carry mail only; calendars need DAV, EWS or Graph.

        IMAP profiles reach appointments, contacts and tasks through the profile's DAV
        location (CalDAV/CardDAV next to the mail server), so they do support ACT when a DAV
        URL is set; see `core.rules.act_location_problem`.
        """
        return self is not ServerKind.POP3


class TlsMode(enum.StrEnum):
    """How a connection is protected. ``none`` needs an explicit opt-in on the profile."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"


class CredentialSource(enum.StrEnum):
    """Whose credentials open the mailbox (the seed's "Authenticate Using")."""

    PROFILE = "profile"  # one service account on the profile
    MAILBOX = "mailbox"  # each mailbox carries its own user name and secret
    APP = "app"  # server-to-server OAuth (client credentials), Exchange Online / Google


class ImpersonationMethod(enum.StrEnum):
    """How a service account acts *as* a user on IMAP, POP3 and SMTP.

    ``authzid`` is SASL PLAIN with an authorization identity (RFC 4616), understood by
    Dovecot, Cyrus and Postfix through Dovecot SASL. ``master-user`` is Dovecot's
    ``user*master`` login name, for servers or clients without authzid.
    """

    AUTHZID = "authzid"
    MASTER_USER = "master-user"


class AccessMode(enum.StrEnum):
    """How a connection reaches a mailbox; decided by `core.rules.access_mode`."""

    OWN = "own"  # the mailbox's own credentials
    IMPERSONATION = "impersonation"  # service account acting as the user
    DELEGATION = "delegation"  # service account acting for the user, with delegate rights
    APP = "app"  # application permission (no user context)


class Channel(enum.StrEnum):
    """The three per-mailbox workloads, each with its own status and schedule."""

    INCOMING = "incoming"
    OUTGOING = "outgoing"
    ACT = "act"  # appointments, contacts and tasks


class SyncMethod(enum.StrEnum):
    NONE = "none"
    SERVER_SIDE = "server-side"


class ApprovalStatus(enum.StrEnum):
    EMPTY = "empty"
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class ChannelStatus(enum.StrEnum):
    NOT_RUN = "not-run"
    SUCCESS = "success"
    FAILURE = "failure"


class TrackingRule(enum.StrEnum):
    """Which incoming mail a user or queue accepts (the reference's filtering method)."""

    ALL = "all"
    REPLIES = "replies"  # in response to tracked email
    CONTACTS_ACCOUNTS_LEADS = "contacts-accounts-leads"
    EMAIL_ENABLED = "email-enabled"
    NONE = "none"


class AfterProcessing(enum.StrEnum):
    """What happens to a message on the server once it is tracked."""

    LEAVE = "leave"
    FLAG = "flag"
    MOVE = "move"
    DELETE = "delete"  # queues only


class PartyKind(enum.StrEnum):
    """Directory records with email addresses, in the reference's resolution order."""

    USER = "user"
    QUEUE = "queue"
    CONTACT = "contact"
    ACCOUNT = "account"
    LEAD = "lead"
    OTHER = "other"  # any other email-enabled record


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server connection: where and how it is protected."""

    host: str
    port: int
    tls: TlsMode = TlsMode.IMPLICIT


@dataclass(frozen=True, slots=True)
class Profile:
    """An email server profile: connection settings shared by many mailboxes."""

    name: str
    kind: ServerKind
    incoming: Endpoint | None
    outgoing: Endpoint | None = None
    credential_source: CredentialSource = CredentialSource.MAILBOX
    service_user: str | None = None
    service_secret: Secret | None = None
    use_impersonation: bool = False
    impersonation_method: ImpersonationMethod = ImpersonationMethod.AUTHZID
    use_same_settings_for_outgoing: bool = True
    # Separate outgoing credentials, used only when use_same_settings_for_outgoing is off.
    outgoing_credential_source: CredentialSource | None = None
    outgoing_service_user: str | None = None
    outgoing_service_secret: Secret | None = None
    allow_plaintext: bool = False  # explicit opt-in for TlsMode.NONE
    ca_file: str | None = None  # extra trust anchor (private CA); system store otherwise
    dav_url: str | None = None  # CalDAV/CardDAV root for ACT on imap profiles
    ews_url: str | None = None  # fixed EWS endpoint (exchange); autodiscover when empty
    tenant_id: str | None = None  # exchange-online
    client_id: str | None = None  # OAuth application id (exchange-online, gmail)
    client_secret: Secret | None = None
    # exchange-online: PEM certificate + RSA private key for a signed client assertion,
    # instead of client_secret (exactly one of the two; see core.rules.validate_profile)
    client_certificate: Secret | None = None
    token_url: str | None = None  # override of the OAuth token endpoint (tests, sovereign clouds)
    api_url: str | None = None  # override of the Graph / Gmail API root
    shared_namespace: str = "shared/{user}/"  # IMAP delegation: where a delegate sees the user
    process_email_from: dt.datetime | None = None
    min_polling_interval_s: int = 60
    max_concurrent_connections: int = 10
    move_failed_to_folder: str | None = None  # e.g. "Undeliverable"; None = leave in place
    send_alert_email: bool = False
    alert_owner: str | None = None  # address that receives profile-level alerts
    connection_timeout_s: float = 30.0
    # Allowed domains ("example.com", "@example.com") or addresses; empty = unrestricted.
    impersonation_scope: tuple[str, ...] = ()
    conflict_policy: str = "application-wins"  # ACT two-way sync; see core.plan
    remove_unfiltered: bool = False  # ACT: delete server copies that leave the sync filter
    description: str = ""
    id: int | None = None


@dataclass(frozen=True, slots=True)
class ChannelState:
    """Per-channel switches and health of one mailbox."""

    method: SyncMethod = SyncMethod.NONE
    enabled: bool = False
    status: ChannelStatus = ChannelStatus.NOT_RUN


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A user's or queue's mailbox on a profile's server."""

    address: str
    owner_kind: PartyKind  # USER or QUEUE
    owner: str  # the owner's key in the directory (user name or queue name)
    profile: str  # profile name
    incoming: ChannelState = ChannelState()
    outgoing: ChannelState = ChannelState()
    act: ChannelState = ChannelState()
    allow_credentials: bool = False  # "Allow to Use Credentials for Email Processing"
    username: str | None = None  # login name on the server (per-mailbox credentials)
    secret: Secret | None = None
    approval: ApprovalStatus = ApprovalStatus.EMPTY
    process_email_from: dt.datetime | None = None
    after_processing: AfterProcessing = AfterProcessing.LEAVE
    after_processing_folder: str | None = None  # for AfterProcessing.MOVE
    tracking_rule: TrackingRule = TrackingRule.REPLIES
    folders: tuple[str, ...] = ("INBOX",)
    track_sent: bool = False
    name: str = ""
    last_tested_at: dt.datetime | None = None
    id: int | None = None

    def channel(self, channel: Channel) -> ChannelState:
        return {Channel.INCOMING: self.incoming, Channel.OUTGOING: self.outgoing,
                Channel.ACT: self.act}[channel]

    @property
    def is_queue(self) -> bool:
        return self.owner_kind is PartyKind.QUEUE


@dataclass(frozen=True, slots=True)
class Party:
    """A directory record that can send or receive email: user, queue, contact, ..."""

    kind: PartyKind
    key: str  # unique within its kind (a login name, a queue name, a CRM id)
    name: str
    emails: tuple[str, ...]
    tracking_rule: TrackingRule = TrackingRule.REPLIES  # users and queues only
    id: int | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """Something an administrator should read: what happened and what to fix."""

    severity: Severity
    code: str
    message: str
    fix: str
    mailbox: str | None = None
    profile: str | None = None
    channel: Channel | None = None
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    id: int | None = None


@dataclass(frozen=True, slots=True)
class OrgSettings:
    """Organisation-wide defaults (the reference's "Email settings")."""

    process_only_approved_mailboxes: bool = True
    tracking_token_prefix: str = "SSY"
    use_tracking_tokens: bool = True
    use_smart_matching: bool = False
    keep_raw_messages: bool = True
    max_attachment_bytes: int = 25 * 1024 * 1024
