"""The seed's rules, one test each, plus the access modes they imply."""

from __future__ import annotations

import dataclasses

import pytest

from serversync.core import rules
from serversync.core.errors import ConfigError, RuleViolation
from serversync.core.model import (
    AccessMode,
    AfterProcessing,
    ApprovalStatus,
    Channel,
    ChannelState,
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

ON = ChannelState(SyncMethod.SERVER_SIDE)
SVC = Profile(name="svc", kind=ServerKind.IMAP, incoming=Endpoint("imap.example.com", 993),
              outgoing=Endpoint("smtp.example.com", 587, TlsMode.STARTTLS),
              credential_source=CredentialSource.PROFILE, service_user="svc@example.com",
              service_secret=Secret("svc-pw"), use_impersonation=True,
              dav_url="https://dav.example.com/", impersonation_scope=("@example.com",))
DELEGATION = dataclasses.replace(SVC, name="deleg", use_impersonation=False)
OWN = dataclasses.replace(SVC, name="own", credential_source=CredentialSource.MAILBOX,
                          service_user=None, service_secret=None, use_impersonation=False,
                          impersonation_scope=())
ALICE = Mailbox("alice@example.com", PartyKind.USER, "alice", "svc", incoming=ON, outgoing=ON,
                act=ON, approval=ApprovalStatus.APPROVED)


def test_delegation_cannot_sync_act() -> None:
    with pytest.raises(RuleViolation) as caught:
        rules.validate_mailbox(DELEGATION, ALICE)
    assert caught.value.code == "act-on-delegation"
    assert "alice@example.com" in caught.value.message
    # email alone is fine on delegation
    rules.validate_mailbox(DELEGATION, dataclasses.replace(ALICE, act=ChannelState()))


def test_switching_a_profile_to_delegation_names_the_act_mailboxes() -> None:
    bob = dataclasses.replace(ALICE, address="bob@example.com")
    mail_only = dataclasses.replace(ALICE, address="carol@example.com", act=ChannelState())
    with pytest.raises(RuleViolation, match="alice@example.com, bob@example.com") as caught:
        rules.delegation_conflicts(DELEGATION, [bob, ALICE, mail_only])
    assert "carol" not in caught.value.message
    rules.delegation_conflicts(SVC, [bob, ALICE])  # impersonation: allowed


def test_mailbox_credentials_need_allow_flag_and_secret() -> None:
    mailbox = dataclasses.replace(ALICE, profile="own")
    with pytest.raises(RuleViolation) as caught:
        rules.check_credentials(OWN, mailbox)
    assert caught.value.code == "credentials-not-allowed"
    with pytest.raises(RuleViolation) as caught:
        rules.check_credentials(OWN, dataclasses.replace(mailbox, allow_credentials=True))
    assert caught.value.code == "credentials-missing"
    ready = dataclasses.replace(mailbox, allow_credentials=True, secret=Secret("pw"))
    rules.check_credentials(OWN, ready)
    assert rules.login_for(OWN, ready, Channel.INCOMING).mode is AccessMode.OWN


def test_same_settings_for_outgoing_authenticates_like_incoming() -> None:
    for profile in (SVC, OWN, DELEGATION):
        mailbox = dataclasses.replace(ALICE, allow_credentials=True, secret=Secret("pw"))
        assert rules.login_for(profile, mailbox, Channel.OUTGOING) == rules.login_for(
            profile, mailbox, Channel.INCOMING)


def test_separate_outgoing_credentials_apply_only_when_same_settings_is_off() -> None:
    with pytest.raises(ConfigError, match="use_same_settings_for_outgoing"):
        rules.validate_profile(dataclasses.replace(
            SVC, outgoing_credential_source=CredentialSource.MAILBOX))
    split = dataclasses.replace(SVC, use_same_settings_for_outgoing=False,
                                outgoing_credential_source=CredentialSource.MAILBOX)
    rules.validate_profile(split)
    mailbox = dataclasses.replace(ALICE, allow_credentials=True, secret=Secret("own-pw"))
    assert rules.login_for(split, mailbox, Channel.INCOMING).mode is AccessMode.IMPERSONATION
    outgoing = rules.login_for(split, mailbox, Channel.OUTGOING)
    assert (outgoing.mode, outgoing.user, outgoing.secret) == (
        AccessMode.OWN, "alice@example.com", Secret("own-pw"))


def test_exchange_online_is_app_only_or_each_users_consent() -> None:
    online = Profile(name="m365", kind=ServerKind.EXCHANGE_ONLINE, incoming=None,
                     credential_source=CredentialSource.APP, tenant_id="t", client_id="c",
                     client_secret=Secret("cs"))
    rules.validate_profile(online)
    with pytest.raises(RuleViolation) as caught:
        rules.validate_profile(dataclasses.replace(
            online, credential_source=CredentialSource.PROFILE, client_secret=None,
            service_user="svc@x.test", service_secret=Secret("pw")))
    assert caught.value.code == "app-only"
    consent = dataclasses.replace(online, credential_source=CredentialSource.MAILBOX,
                                  client_secret=None)
    rules.validate_profile(consent)  # a public client: each user signs in (device code)
    with pytest.raises(ConfigError, match="client_id"):
        rules.validate_profile(dataclasses.replace(consent, client_id=None))
    user = Mailbox("a@example.com", PartyKind.USER, "a", "m365", allow_credentials=True)
    with pytest.raises(RuleViolation, match="has not signed in") as missing:
        rules.login_for(consent, user, Channel.INCOMING)
    assert "serversync mailbox sign-in a@example.com" in (missing.value.fix or "")
    login = rules.login_for(consent, dataclasses.replace(user, secret=Secret("rt")),
                            Channel.ACT)
    assert (login.mode, login.secret) == (AccessMode.OWN, Secret("rt"))
    with pytest.raises(RuleViolation, match="no service account password"):
        rules.validate_profile(dataclasses.replace(online, service_secret=Secret("x")))
    mailbox = Mailbox("a@example.com", PartyKind.USER, "a", "m365", secret=Secret("pw"))
    with pytest.raises(RuleViolation, match="per-mailbox user names and passwords"):
        rules.check_credentials(online, mailbox)
    with pytest.raises(ConfigError, match="tenant_id"):
        rules.validate_profile(dataclasses.replace(online, tenant_id=None))


def test_impersonation_scope_refuses_other_domains() -> None:
    erin = dataclasses.replace(ALICE, address="erin@other.test")
    with pytest.raises(RuleViolation) as caught:
        rules.login_for(SVC, erin, Channel.INCOMING)
    assert caught.value.code == "outside-scope"
    assert "erin@other.test" in caught.value.message and "svc" in caught.value.message
    assert rules.in_scope(SVC, "ALICE@example.com")
    assert not rules.in_scope(SVC, "x@sub.example.com")  # subdomains are not implied
    exact = dataclasses.replace(SVC, impersonation_scope=("ceo@other.test",))
    assert rules.in_scope(exact, "ceo@other.test") and not rules.in_scope(exact, "x@other.test")
    assert rules.in_scope(dataclasses.replace(SVC, impersonation_scope=()), "x@any.test")
    # per-mailbox credentials have no service account, so no scope applies
    rules.check_scope(OWN, erin)


def test_only_approved_mailboxes_are_processed_by_default() -> None:
    pending = dataclasses.replace(ALICE, approval=ApprovalStatus.PENDING)
    problem = rules.enable_problems(OrgSettings(), SVC, pending, Channel.INCOMING)
    assert problem is not None and problem.code == "not-approved"
    assert "serversync mailbox approve alice@example.com" in problem.fix
    relaxed = OrgSettings(process_only_approved_mailboxes=False)
    assert rules.enable_problems(relaxed, SVC, pending, Channel.INCOMING) is None


def test_impersonation_logins() -> None:
    authzid = rules.login_for(SVC, ALICE, Channel.INCOMING)
    assert (authzid.user, authzid.authzid, authzid.service) == (
        "svc@example.com", "alice@example.com", "svc@example.com")
    master = rules.login_for(dataclasses.replace(
        SVC, impersonation_method=ImpersonationMethod.MASTER_USER), ALICE, Channel.INCOMING)
    assert (master.user, master.authzid) == ("alice@example.com*svc@example.com", None)
    delegate = rules.login_for(DELEGATION, ALICE, Channel.INCOMING)
    assert (delegate.mode, delegate.user, delegate.authzid) == (
        AccessMode.DELEGATION, "svc@example.com", None)


@pytest.mark.parametrize(("change", "field"), [
    ({"incoming": Endpoint("h", 0)}, "incoming.port"),
    ({"incoming": Endpoint("h", 143, TlsMode.NONE)}, "incoming.tls"),
    ({"incoming": Endpoint("", 143)}, "incoming.host"),
    ({"max_concurrent_connections": 301}, "max_concurrent_connections"),
    ({"max_concurrent_connections": 0}, "max_concurrent_connections"),
    ({"service_secret": None}, "service_secret"),
    ({"credential_source": CredentialSource.MAILBOX}, "use_impersonation"),
    ({"impersonation_scope": ("not a domain!",)}, "impersonation_scope[0]"),
    ({"dav_url": "http://dav.example.com/"}, "dav_url"),
])
def test_profile_validation_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules.validate_profile(dataclasses.replace(SVC, **change))  # type: ignore[arg-type]
    assert caught.value.field == field


def test_plaintext_needs_explicit_opt_in() -> None:
    plain = dataclasses.replace(SVC, incoming=Endpoint("h", 143, TlsMode.NONE),
                                allow_plaintext=True, dav_url="http://dav/")
    rules.validate_profile(plain)


def test_act_needs_a_calendar_server_and_a_user() -> None:
    pop3 = dataclasses.replace(SVC, kind=ServerKind.POP3)
    assert (p := rules.act_problem(pop3, ALICE)) is not None and p.code == "act-unsupported"
    no_dav = dataclasses.replace(SVC, dav_url=None)
    assert (p := rules.act_problem(no_dav, ALICE)) is not None and "dav_url" in p.message
    queue = dataclasses.replace(ALICE, owner_kind=PartyKind.QUEUE)
    assert (p := rules.act_problem(SVC, queue)) is not None and "queue" in p.message


def test_delete_after_processing_is_for_queues_only() -> None:
    user = dataclasses.replace(ALICE, act=ChannelState(), after_processing=AfterProcessing.DELETE)
    with pytest.raises(ConfigError, match="queue"):
        rules.validate_mailbox(SVC, user)
    rules.validate_mailbox(SVC, dataclasses.replace(user, owner_kind=PartyKind.QUEUE))


def test_secrets_never_print() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}" and "svc-pw" not in repr(SVC)
    assert "hunter2" not in repr(rules.login_for(SVC, ALICE, Channel.INCOMING))
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(secret)
