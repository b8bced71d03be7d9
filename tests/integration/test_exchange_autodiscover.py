"""EWS autodiscover against the loopback autodiscover service (`tests.fakes.autodiscover`).

Verified only against that fake, over real TLS with a test CA: it answers in the shapes of
Microsoft's Autodiscover reference (``tests/fixtures/ews/autodiscover-*.xml``), not as a
real Exchange does. Host names (``*.corp.test``, ``evil.example``) resolve to 127.0.0.1
inside the process; SRV queries are answered from a table; any connection or datagram to
a non-loopback address is refused and recorded, and each test asserts that none was tried
and which names were looked up.

Covers: Test & Enable shows the discovered URL and the incoming job syncs through it; no
answer → ``autodiscover-failed``; a wrong password → ``auth-failed``; an unknown mailbox →
``mailbox-not-found``; redirects (HTTP 302, RedirectUrl, SRV) to a host outside the
mailbox's domain are refused before any credential is sent there; redirects inside it, the
plain-HTTP step (only with allow_plaintext) and SRV records are followed; an untrusted
certificate stops discovery before credentials are sent; the per-profile cache (one
discovery for many mailboxes, a changed answer picked up) and that exchangelib's own
autodiscover (and its cache file) is never used.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from exchangelib.autodiscover import cache as exchangelib_cache
from exchangelib.autodiscover import discovery as exchangelib_discovery
from lxml import etree

from serversync import wiring
from serversync.connectors import ews, ews_discover
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import PermanentError, SyncError
from serversync.core.model import Channel, CredentialSource, Mailbox, PartyKind, Profile, ServerKind
from serversync.core.rules import login_for
from serversync.core.secret import Secret
from serversync.manifest import Manifest, validate
from serversync.services import Services
from serversync.services.incoming import IncomingJob
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from tests.fakes.autodiscover import PATH, AutodiscoverServer, LocalNames, TestCA
from tests.fakes.ews_server import EwsServer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ews"
SVC, BOB, CAROL, NOBODY = "svc@corp.test", "bob@corp.test", "carol@corp.test", "nobody@corp.test"
PASSWORDS = {SVC: "svc-Secr3t!", BOB: "bob-Secr3t!", CAROL: "carol-Secr3t!"}
AD_HOST, EWS_HOST = "autodiscover.corp.test", "mail.corp.test"
EWS_URL = f"https://{EWS_HOST}/EWS/Exchange.asmx"
HOSTS = {"corp.test", AD_HOST, EWS_HOST, "mail2.corp.test", "autodiscover-s.corp.test",
         "evil.example"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"), sorted(HOSTS))


@pytest.fixture(autouse=True)
def no_exchangelib_autodiscover(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """exchangelib's discovery (and its cache file in the temp directory) must never run."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("exchangelib autodiscover was used")
    monkeypatch.setattr(exchangelib_discovery.Autodiscovery, "discover", refuse)
    monkeypatch.setattr(exchangelib_cache, "shelve_open_with_failover", refuse)
    ews_discover.clear()
    yield
    ews_discover.clear()


@pytest.fixture
def ews_fake() -> EwsServer:
    fake = EwsServer()  # not started: its handler serves mail.corp.test through `ad`
    for address, password in PASSWORDS.items():
        fake.add_user(address, password, mailbox=address != SVC)
    fake.impersonators.add(SVC)
    return fake


@pytest.fixture
def ad(ews_fake: EwsServer, ca: TestCA) -> Iterator[AutodiscoverServer]:
    server = AutodiscoverServer(ews_fake, ca.server_context(), answering={AD_HOST},
                                ews_hosts={EWS_HOST, "mail2.corp.test"},
                                settings={"ExternalEwsUrl": EWS_URL}).start()
    yield server
    server.stop()
    assert not server.errors and not server.https.errors and not server.http.errors, (
        server.errors, server.https.errors, server.http.errors)


@pytest.fixture
def names(ad: AutodiscoverServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalNames]:
    local = LocalNames(HOSTS - {"autodiscover-s.corp.test"}, ad.ports).install(monkeypatch)
    yield local
    assert local.blocked == [], local.blocked  # nothing tried to leave the machine


@pytest.fixture
def services(db: Database) -> Services:
    return Services(db, wiring.PROBERS)


def profile_spec(ca: TestCA, **extra: Any) -> dict[str, Any]:
    return {"kind": "exchange", "name": "imp", "credential_source": "profile",
            "service_user": SVC, "service_secret": PASSWORDS[SVC], "use_impersonation": True,
            "ca_file": str(ca.ca_file), **extra}


async def setup(services: Services, ca: TestCA, *addresses: str, **extra: Any) -> None:
    boxes = [{"address": a, "owner": a.split("@")[0], "profile": "imp",
              "incoming": "server-side", "outgoing": "none", "act": "none",
              "approval": "approved", "tracking_rule": "all"} for a in addresses]
    directory = [{"kind": "user", "key": b["owner"], "emails": [b["address"]]} for b in boxes]
    await services.apply(validate(Manifest, {"directory": directory,
                                             "profiles": [profile_spec(ca, **extra)],
                                             "mailboxes": boxes}))


def profile(ca: TestCA | None, **extra: Any) -> Profile:
    values: dict[str, Any] = {"credential_source": CredentialSource.PROFILE,
                              "service_user": SVC, "service_secret": Secret(PASSWORDS[SVC]),
                              "use_impersonation": True,
                              "ca_file": str(ca.ca_file) if ca else None, **extra}
    return Profile("imp", ServerKind.EXCHANGE, None, **values)


async def discover(prof: Profile, address: str = BOB) -> ews.EwsMailbox:
    """Connect one mailbox (GetFolder on the Inbox) through autodiscover."""
    box = Mailbox(address, PartyKind.USER, address.split("@")[0], "imp")
    client = ews.EwsMailbox(prof, login_for(prof, box, Channel.INCOMING),
                            ConnectOptions(timeout=5, ca_file=prof.ca_file))
    try:
        await client.folder_count("inbox")
    finally:
        await client.close()
    return client


def autodiscover_posts(ad: AutodiscoverServer, host: str = AD_HOST) -> list[Any]:
    return [r for r in ad.requests_to(host) if r.method == "POST"]


def canonical(xml: bytes) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    return bytes(etree.tostring(etree.fromstring(xml, parser), method="c14n"))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------- Test & Enable, then sync


async def test_discovered_url_is_shown_and_the_incoming_job_syncs_through_it(
        services: Services, ad: AutodiscoverServer, names: LocalNames, ca: TestCA,
        db: Database) -> None:
    await setup(services, ca, BOB)
    report = await services.test_enable(BOB)
    assert report.ok, report.results
    [result] = report.results
    assert result.summary.startswith(
        f"EWS {EWS_URL} (found by autodiscover at https://{AD_HOST}{PATH}): {BOB}"), result

    # the wire: the web site at corp.test answered 404; autodiscover.corp.test was asked
    # first without, then with credentials, with the documented request
    assert [(r.method, r.path) for r in ad.requests_to("corp.test")] == [("POST", PATH)]
    first, second = autodiscover_posts(ad)
    assert "authorization" not in first.headers
    assert second.headers["authorization"] == basic(SVC, PASSWORDS[SVC])
    for request in (first, second):
        assert request.headers["content-type"] == "text/xml; charset=utf-8"
        assert canonical(request.body) == canonical(
            (FIXTURES / "autodiscover-getusersettings-request.xml").read_bytes())
    ews_requests = [r for r in ad.https.requests if r.path.startswith("/EWS/")]
    assert ews_requests and {r.headers["host"] for r in ews_requests} == {EWS_HOST}
    # every credential went to a host of corp.test, over TLS
    assert {r.headers["host"] for r in ad.https.requests if "authorization" in r.headers} \
        <= {AD_HOST, EWS_HOST}
    assert ad.http.requests == []  # no plain-HTTP step without allow_plaintext

    ad.ews.deliver(BOB, (f"From: olga@customer.test\r\nTo: {BOB}\r\nSubject: hello\r\n"
                         "Message-ID: <ad-1@corp.test>\r\n\r\nbody\r\n").encode())
    job = IncomingJob(db, wiring.INCOMING_SOURCES)
    assert (await job(BOB)).items == 1
    async with db.transaction() as repo:
        found = await EmailStore(repo.session).list(limit=10)
    assert [a.message_id for a in found] == ["<ad-1@corp.test>"]
    assert len(autodiscover_posts(ad)) == 2  # the run used the remembered answer

    assert set(names.asked) == {"corp.test", AD_HOST, EWS_HOST}
    assert names.srv_asked == []


# ---------------------------------------------------------------- failures become alerts


async def test_no_autodiscover_answer_is_the_autodiscover_failed_alert(
        services: Services, ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    ad.answering.clear()
    await setup(services, ca, BOB)
    report = await services.test_enable(BOB)
    assert not report.ok
    [alert] = await services.alerts(mailbox=BOB)
    assert alert.code == "autodiscover-failed"
    assert "set ews_url" in alert.fix and "_autodiscover._tcp.corp.test" in alert.fix
    assert f"https://corp.test{PATH}: HTTP 404" in alert.message
    assert f"https://{AD_HOST}{PATH}: HTTP 404" in alert.message
    assert "SRV _autodiscover._tcp.corp.test: NXDOMAIN" in alert.message
    assert not [r for r in ad.https.requests if "authorization" in r.headers]
    assert names.srv_asked == ["_autodiscover._tcp.corp.test."]
    assert set(names.asked) == {"corp.test", AD_HOST}
    assert not (await services.get_mailbox(BOB)).incoming.enabled


async def test_a_wrong_password_at_autodiscover_is_the_wrong_password_alert(
        services: Services, ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    ad.ews.passwords[SVC] = "changed-on-the-server"
    await setup(services, ca, BOB)
    report = await services.test_enable(BOB)
    assert [r.code for r in report.results] == ["auth-failed"], report.results
    [alert] = await services.alerts(mailbox=BOB)
    assert alert.code == "auth-failed" and "service_secret" in alert.fix
    assert f"login of {SVC} was rejected (401) at https://{AD_HOST}{PATH}" in alert.message
    assert PASSWORDS[SVC] not in alert.message + alert.fix
    assert ad.requests_to(EWS_HOST, "/EWS/") == []


async def test_an_unknown_mailbox_is_mailbox_not_found(
        services: Services, ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    await setup(services, ca, NOBODY)
    report = await services.test_enable(NOBODY)
    assert [r.code for r in report.results] == ["mailbox-not-found"], report.results
    assert "InvalidUser" in report.results[0].summary


@pytest.mark.parametrize("how", ["http-302", "redirect-url", "srv"])
async def test_a_redirect_outside_the_domain_is_refused(
        services: Services, ad: AutodiscoverServer, names: LocalNames, ca: TestCA,
        how: str) -> None:
    evil = f"https://evil.example{PATH}"
    if how == "http-302":
        ad.answering.clear()
        ad.redirects[AD_HOST] = evil
    elif how == "redirect-url":
        ad.answering.clear()
        ad.redirect_urls[AD_HOST] = evil
    else:
        ad.answering = {"evil.example"}
        names.srv["_autodiscover._tcp.corp.test"] = ["0 0 443 evil.example."]
    ad.answering.add("evil.example")  # it would answer, with a valid certificate
    await setup(services, ca, BOB)
    report = await services.test_enable(BOB)
    assert [r.code for r in report.results] == ["autodiscover-redirect-refused"], report.results
    [alert] = await services.alerts(mailbox=BOB)
    assert "evil.example" in alert.message and "outside corp.test" in alert.message
    assert "set ews_url" in alert.fix
    assert "evil.example" not in names.asked  # not even looked up
    assert ad.requests_to("evil.example", "/") == []
    if how == "redirect-url":  # that answer needed a login, at autodiscover.corp.test only
        assert [r.headers["host"] for r in ad.https.requests if "authorization" in r.headers] \
            == [AD_HOST]
    else:  # a redirect is seen before any credential is sent
        assert not [r for r in ad.https.requests if "authorization" in r.headers]


async def test_an_untrusted_certificate_stops_discovery_before_credentials(
        ad: AutodiscoverServer, names: LocalNames) -> None:
    with pytest.raises(PermanentError) as caught:
        await discover(profile(None))
    assert caught.value.code == "autodiscover-failed"
    for host in ("corp.test", AD_HOST):
        assert f"https://{host}{PATH}: TLS certificate not accepted" in caught.value.message
    assert "ca_file" in caught.value.fix
    assert ad.https.requests == []  # not one request (let alone a password) got through


# ---------------------------------------------------------------- the other ways in


async def test_a_redirect_inside_the_domain_is_followed(
        ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    names.names.add("autodiscover-s.corp.test")
    ad.answering = {"autodiscover-s.corp.test"}
    ad.redirects[AD_HOST] = f"https://autodiscover-s.corp.test{PATH}"
    client = await discover(profile(ca))
    assert client.found is not None and client.found.ews_url == EWS_URL
    assert client.found.via == f"https://autodiscover-s.corp.test{PATH}"
    assert [r.headers["host"] for r in ad.https.requests if "authorization" in r.headers
            and r.path == PATH] == ["autodiscover-s.corp.test"]


async def test_the_plain_http_step_needs_allow_plaintext(
        ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    ad.answering = {EWS_HOST}
    ad.plain_redirects[AD_HOST] = f"https://{EWS_HOST}/autodiscover/autodiscover.xml"
    with pytest.raises(SyncError) as caught:
        await discover(profile(ca))
    assert caught.value.code == "autodiscover-failed"
    assert ad.http.requests == []

    ews_discover.clear()
    client = await discover(profile(ca, allow_plaintext=True))
    [plain] = ad.http.requests
    assert (plain.method, plain.path, plain.body) == ("GET", "/autodiscover/autodiscover.xml",
                                                      b"")
    assert "authorization" not in plain.headers  # no credentials over plain HTTP, ever
    assert client.found is not None and client.found.via == f"https://{EWS_HOST}{PATH}"


async def test_an_srv_record_inside_the_domain_is_used(
        ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    ad.answering = {EWS_HOST}
    names.srv["_autodiscover._tcp.corp.test"] = ["10 0 443 evil.example.",
                                                 "0 5 443 mail.corp.test."]
    client = await discover(profile(ca))
    assert client.found is not None and client.found.via == f"https://{EWS_HOST}{PATH}"
    assert "evil.example" not in names.asked
    assert names.srv_asked == ["_autodiscover._tcp.corp.test."]


# ---------------------------------------------------------------- the per-profile cache


async def test_one_discovery_serves_many_mailboxes_and_a_changed_answer_is_picked_up(
        ad: AutodiscoverServer, names: LocalNames, ca: TestCA) -> None:
    prof = profile(ca)
    await discover(prof, BOB)
    await discover(prof, CAROL)
    assert len(autodiscover_posts(ad)) == 2  # one discovery (two POSTs) for both

    # the organisation moves EWS: the old URL stops answering, autodiscover says mail2
    ad.ews_hosts.discard(EWS_HOST)
    ad.settings["ExternalEwsUrl"] = "https://mail2.corp.test/EWS/Exchange.asmx"
    with pytest.raises(SyncError):
        await discover(prof, BOB)  # fails at the remembered URL, which is dropped
    client = await discover(prof, BOB)
    assert client.where == "https://mail2.corp.test/EWS/Exchange.asmx"
    assert len(autodiscover_posts(ad)) == 4


async def test_test_and_enable_asks_again_but_shares_one_discovery(
        services: Services, ad: AutodiscoverServer, names: LocalNames, ca: TestCA,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await setup(services, ca, BOB, CAROL)
    await services.test_enable(BOB)
    await services.test_enable(CAROL)
    assert len(autodiscover_posts(ad)) == 2  # within PROBE_MAX_AGE_S: one discovery
    monkeypatch.setattr(ews_discover, "PROBE_MAX_AGE_S", 0.0)
    await services.test_enable(BOB)
    assert len(autodiscover_posts(ad)) == 4  # an older answer is not shown as current


def test_the_name_guard_keeps_everything_on_the_machine(
        ad: AutodiscoverServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself: unknown names fail locally, nothing reaches another address."""
    import socket

    import dns.resolver

    local = LocalNames({AD_HOST}, ad.ports).install(monkeypatch)
    [(_, _, _, _, address)] = socket.getaddrinfo(AD_HOST, 443)
    assert address == ("127.0.0.1", ad.https.port)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("www.example.com", 443)
    with pytest.raises(dns.resolver.NXDOMAIN):
        dns.resolver.resolve("example.com.", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            pytest.raises(OSError, match="not loopback"):
        udp.sendto(b"query", ("192.0.2.53", 53))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
            pytest.raises(OSError, match="not loopback"):
        tcp.connect(("192.0.2.80", 443))
    assert local.blocked == [("192.0.2.53", 53), ("192.0.2.80", 443)]
    assert local.asked == [AD_HOST, "www.example.com"]
    assert local.srv_asked == ["example.com."]


async def test_no_password_in_logs_or_urls(ad: AutodiscoverServer, names: LocalNames, ca: TestCA,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await discover(profile(ca))
    ad.ews.passwords[SVC] = "changed-on-the-server"
    ews_discover.clear()
    with pytest.raises(SyncError):
        await discover(profile(ca))
    assert caplog.records
    for secret in (PASSWORDS[SVC], basic(SVC, PASSWORDS[SVC])[6:]):
        assert all(secret not in r.getMessage() for r in caplog.records), secret
        assert all(secret not in r.path for r in ad.https.requests + ad.http.requests)
