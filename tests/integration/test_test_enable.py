"""Test & Enable against the real Dovecot, Postfix and Radicale on loopback.

Both credential models (a service account impersonating users, and each mailbox's own
password), delegation for email, and every failure the issue names, each ending as a
channel failure with an alert that says what to fix. Test users: ivan, judy (and the
service accounts svc and delegate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from serversync import wiring
from serversync.core.model import (
    ApprovalStatus,
    Channel,
    ChannelState,
    ChannelStatus,
    SyncMethod,
)
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services import TestReport as Report
from serversync.store.db import Database
from tests import testservers as ts

pytestmark = pytest.mark.usefixtures("test_servers")

IVAN, JUDY = "ivan@example.test", "judy@example.test"
CA = str(ts.CA_FILE)
DAV = f"{ts.DAV_URL}/"
IMAPS = {"host": ts.HOST, "port": ts.IMAPS_PORT, "tls": "implicit"}
IMAP_STARTTLS = {"host": ts.HOST, "port": ts.IMAP_PORT, "tls": "starttls"}
SUBMISSION = {"host": ts.HOST, "port": ts.SUBMISSION_PORT, "tls": "starttls"}
SUBMISSIONS = {"host": ts.HOST, "port": ts.SUBMISSIONS_PORT, "tls": "implicit"}
DIRECTORY = [{"kind": "user", "key": u.split("@")[0], "emails": [u]}
             for u in (IVAN, JUDY, ts.ERIN)]


def profile(name: str, **fields: Any) -> dict[str, Any]:
    base = {"name": name, "kind": "imap", "incoming": IMAPS, "outgoing": SUBMISSION,
            "ca_file": CA, "dav_url": DAV, "allow_plaintext": True}
    return {**base, **fields}


IMPERSONATION = profile("imp", credential_source="profile", service_user=ts.SVC,
                        service_secret="svc-pw", use_impersonation=True,
                        impersonation_scope=["example.test"])
OWN = profile("own", credential_source="mailbox", incoming=IMAP_STARTTLS, outgoing=SUBMISSIONS)
DELEGATION = profile("deleg", credential_source="profile", service_user=ts.DELEGATE,
                     service_secret="delegate-pw", use_impersonation=False)


def mailbox(address: str, profile_name: str, *, channels: tuple[str, ...] = ("incoming",),
            **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"address": address, "owner": address.split("@")[0],
                            "profile": profile_name, "approval": "approved"}
    data.update({channel: "server-side" for channel in channels})
    return {**data, **fields}


async def configure(services: Services, profiles: list[dict[str, Any]],
                    mailboxes: list[dict[str, Any]]) -> None:
    manifest = validate(Manifest, {"directory": DIRECTORY, "profiles": profiles,
                                   "mailboxes": mailboxes})
    await services.apply(manifest)


def by_channel(report: Report) -> dict[Channel, Any]:
    return {r.channel: r for r in report.results}


@pytest.fixture(autouse=True)
def _clean_dav() -> None:
    for user in (IVAN, JUDY):
        ts.reset_dav(user)
    ts.set_acl(JUDY, "INBOX", ts.DELEGATE, "")


async def test_service_account_impersonation_enables_every_channel(services: Services) -> None:
    await configure(services, [IMPERSONATION], [
        mailbox(IVAN, "imp", channels=("incoming", "outgoing", "act"))])
    report = await services.test_enable(IVAN)
    assert report.ok, report
    results = by_channel(report)
    assert "as impersonation: opened INBOX" in results[Channel.INCOMING].summary
    assert "created the principal collection" in results[Channel.ACT].summary
    stored = await services.get_mailbox(IVAN)
    for channel in Channel:
        assert stored.channel(channel).enabled
        assert stored.channel(channel).status is ChannelStatus.SUCCESS
    assert stored.last_tested_at is not None
    assert await services.alerts(mailbox=IVAN) == []


async def test_own_credentials_enable_every_channel(services: Services) -> None:
    await configure(services, [OWN], [
        mailbox(JUDY, "own", channels=("incoming", "outgoing", "act"), allow_credentials=True,
                secret="judy-pw")])
    report = await services.test_enable(JUDY)
    assert report.ok, report
    assert "IMAP (starttls)" in by_channel(report)[Channel.INCOMING].summary
    assert "SMTP (implicit)" in by_channel(report)[Channel.OUTGOING].summary


async def test_master_user_impersonation_and_pop3(sqlite_db: Database) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    master = profile("master", credential_source="profile", service_user=ts.SVC,
                     service_secret="svc-pw", use_impersonation=True,
                     impersonation_method="master-user")
    pop3 = profile("pop", kind="pop3", credential_source="mailbox", dav_url=None,
                   incoming={"host": ts.HOST, "port": ts.POP3S_PORT, "tls": "implicit"})
    await configure(services, [master, pop3], [
        mailbox(IVAN, "master", channels=("incoming", "outgoing")),
        mailbox(JUDY, "pop", allow_credentials=True, secret="judy-pw")])
    assert (await services.test_enable(IVAN)).ok
    report = await services.test_enable(JUDY)
    assert report.ok and "POP3 (implicit)" in report.results[0].summary


async def test_delegation_needs_delegate_rights_for_email(sqlite_db: Database) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    await configure(services, [DELEGATION], [
        mailbox(JUDY, "deleg", channels=("incoming", "outgoing"))])
    report = await services.test_enable(JUDY)
    incoming = by_channel(report)[Channel.INCOMING]
    assert not incoming.ok and incoming.code == "delegate-rights-missing"
    assert "SETACL" in incoming.fix
    outgoing = by_channel(report)[Channel.OUTGOING]
    assert outgoing.ok and "on behalf of" in outgoing.summary
    alerts = await services.alerts(mailbox=JUDY)
    assert [(a.code, a.channel) for a in alerts] == [("delegate-rights-missing", Channel.INCOMING)]

    ts.set_acl(JUDY, "INBOX", ts.DELEGATE, "lrs")
    report = await services.test_enable(JUDY)
    assert report.ok, report
    assert "as delegation: opened shared/judy@example.test" in report.results[0].summary
    assert await services.alerts(mailbox=JUDY) == []  # resolved by the successful test
    assert len(await services.alerts(mailbox=JUDY, include_resolved=True)) == 1


FAILURES: list[tuple[str, dict[str, Any], dict[str, Any], Channel, str, str]] = [
    ("connection refused", profile("p", credential_source="mailbox",
                                   incoming={"host": ts.HOST, "port": 1, "tls": "implicit"}),
     {"allow_credentials": True, "secret": "judy-pw"}, Channel.INCOMING, "connection-refused",
     "check the host and port"),
    ("certificate not trusted", profile("p", credential_source="mailbox", ca_file=None),
     {"allow_credentials": True, "secret": "judy-pw"}, Channel.INCOMING, "tls-untrusted",
     "ca_file"),
    ("host name mismatch", profile("p", credential_source="mailbox",
                                   incoming={**IMAPS, "host": ts.HOST_MISMATCH}),
     {"allow_credentials": True, "secret": "judy-pw"}, Channel.INCOMING, "tls-hostname",
     "host name the certificate was issued for"),
    ("wrong password", profile("p", credential_source="mailbox"),
     {"allow_credentials": True, "secret": "wrong-pw"}, Channel.INCOMING, "auth-failed",
     "update the mailbox's username and secret"),
    ("service account password wrong", {**IMPERSONATION, "name": "p", "service_secret": "bad"},
     {}, Channel.INCOMING, "auth-failed", "service_secret"),
    ("impersonation not permitted", {**IMPERSONATION, "name": "p", "service_user": IVAN,
                                     "service_secret": "ivan-pw"},
     {}, Channel.INCOMING, "impersonation-refused", "impersonation rights"),
    ("DAV rights missing for the service account",
     {**IMPERSONATION, "name": "p", "service_user": ts.DELEGATE, "service_secret": "delegate-pw"},
     {"incoming": "none", "act": "server-side"}, Channel.ACT, "impersonation-refused",
     "rights on every user's collections"),
    ("sender not owned", profile("p", credential_source="mailbox", outgoing=SUBMISSIONS),
     {"allow_credentials": True, "username": IVAN, "secret": "ivan-pw", "incoming": "none",
      "outgoing": "server-side"}, Channel.OUTGOING, "sender-not-owned", "smtpd_sender_login_maps"),
    ("not approved", profile("p", credential_source="mailbox"),
     {"allow_credentials": True, "secret": "judy-pw", "approval": "pending"}, Channel.INCOMING,
     "not-approved", "serversync mailbox approve judy@example.test"),
    ("allow to use credentials off", profile("p", credential_source="mailbox"),
     {"secret": "judy-pw"}, Channel.INCOMING, "credentials-not-allowed", "allow_credentials"),
]


@pytest.mark.parametrize(("case", "profile_data", "mailbox_fields", "channel", "code", "fix"),
                         FAILURES, ids=[f[0] for f in FAILURES])
async def test_failures_disable_the_channel_with_an_alert(
        sqlite_db: Database, case: str, profile_data: dict[str, Any],
        mailbox_fields: dict[str, Any], channel: Channel, code: str, fix: str) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    await configure(services, [profile_data], [mailbox(JUDY, "p", **mailbox_fields)])
    report = await services.test_enable(JUDY)
    result = by_channel(report)[channel]
    assert not result.ok and result.code == code, result
    assert fix in result.fix, result.fix
    stored = await services.get_mailbox(JUDY)
    assert stored.channel(channel).status is ChannelStatus.FAILURE
    assert not stored.channel(channel).enabled
    alerts = await services.alerts(mailbox=JUDY)
    assert [(a.code, a.channel, a.fix) for a in alerts] == [(code, channel, result.fix)]
    for secret in ("judy-pw", "svc-pw", "ivan-pw", "delegate-pw", "wrong-pw"):
        assert secret not in result.summary and secret not in alerts[0].message


async def test_outside_scope_is_refused_without_connecting(sqlite_db: Database) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    await configure(services, [IMPERSONATION], [])
    with pytest.raises(Exception, match="outside the impersonation scope"):
        await configure(services, [IMPERSONATION], [mailbox(ts.ERIN, "imp")])
    # A mailbox saved before the scope was narrowed is refused at Test & Enable.
    await configure(services, [{**IMPERSONATION, "impersonation_scope": []}],
                    [mailbox(ts.ERIN, "imp")])
    async with sqlite_db.transaction() as repo:
        saved = await repo.get_profile("imp")
        await repo.save_profile(dataclasses.replace(saved, impersonation_scope=("@example.test",)))
    report = await services.test_enable(ts.ERIN)
    assert report.results[0].code == "outside-scope"
    assert "add the mailbox's domain" in report.results[0].fix


async def test_act_on_a_delegation_profile_is_refused(sqlite_db: Database) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    with pytest.raises(Exception, match="does not support syncing appointments"):
        await configure(services, [DELEGATION], [mailbox(JUDY, "deleg", channels=("act",))])
    # Data written by an older version (or by hand) is still refused at Test & Enable.
    await configure(services, [DELEGATION], [mailbox(JUDY, "deleg")])
    async with sqlite_db.transaction() as repo:
        stored = await repo.get_mailbox(JUDY)
        await repo.save_mailbox(dataclasses.replace(stored, act=ChannelState(SyncMethod.SERVER_SIDE)))
    report = await services.test_enable(JUDY)
    assert by_channel(report)[Channel.ACT].code == "act-on-delegation"


async def test_rejecting_disables_every_channel(sqlite_db: Database) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    await configure(services, [OWN], [mailbox(JUDY, "own", channels=("incoming", "outgoing"),
                                              allow_credentials=True, secret="judy-pw")])
    assert (await services.test_enable(JUDY)).ok
    rejected = await services.set_approval(JUDY, ApprovalStatus.REJECTED)
    assert not rejected.incoming.enabled and not rejected.outgoing.enabled
    report = await services.test_enable(JUDY)
    assert {r.code for r in report.results} == {"not-approved"}


async def test_profile_test_enable_tests_every_mailbox(sqlite_db: Database) -> None:
    services = Services(sqlite_db, wiring.PROBERS)
    await configure(services, [IMPERSONATION], [mailbox(IVAN, "imp"), mailbox(JUDY, "imp")])
    reports = await services.test_enable_profile("imp")
    assert sorted(r.mailbox for r in reports) == [IVAN, JUDY] and all(r.ok for r in reports)
