"""`connectors.ews_discover`: the documented wire shapes, the trust rule and the cache.

The request and responses are checked against ``tests/fixtures/ews/autodiscover-*.xml``
(each names the Microsoft page it follows); the loopback fake's answers are checked to have
the fixture's shape, so the integration tests talk to something documented.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from lxml import etree
from requests_ntlm import HttpNtlmAuth

from serversync.connectors import ews_discover
from serversync.connectors.ews_discover import Found
from serversync.core.errors import AuthError, PermanentError
from tests.fakes.autodiscover import user_response

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ews"
KEY = ews_discover.cache_key("imp", "bob@corp.test", None, False)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def canonical(xml: bytes) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    return bytes(etree.tostring(etree.fromstring(xml, parser), method="c14n"))


def shape(xml: bytes) -> list[str]:
    """Element paths (namespace + local name), without text: the documented structure."""
    root = etree.fromstring(xml, etree.XMLParser(remove_comments=True))
    tree = etree.ElementTree(root)
    return sorted({tree.getpath(e).replace("[1]", "") + " " + str(e.tag) for e in root.iter()
                   if isinstance(e.tag, str)} - {""})


# ---------------------------------------------------------------- wire format


def test_the_request_is_the_documented_getusersettings() -> None:
    built = ews_discover.build_request(
        "bob@corp.test", "https://autodiscover.corp.test/autodiscover/autodiscover.svc")
    assert canonical(built) == canonical(fixture("autodiscover-getusersettings-request.xml"))
    assert built.startswith(b'<?xml version="1.0" encoding="utf-8"?>')


def test_the_request_escapes_what_it_carries() -> None:
    built = ews_discover.build_request("a&b@corp.test", "https://x.corp.test/a?b=<c>")
    root = etree.fromstring(built)
    assert root.findtext(f".//{{{ews_discover.AD}}}Mailbox") == "a&b@corp.test"
    assert root.findtext(f".//{{{ews_discover.WSA}}}To") == "https://x.corp.test/a?b=<c>"


def test_documented_responses_parse() -> None:
    ok = ews_discover.parse_response(fixture("autodiscover-getusersettings-response.xml"))
    assert ok.code == "NoError" and ok.redirect_target is None
    assert ok.settings == {"ExternalEwsUrl": "https://mail.corp.test/EWS/Exchange.asmx",
                           "InternalEwsUrl": "https://exch01.corp.test/EWS/Exchange.asmx"}
    moved = ews_discover.parse_response(fixture("autodiscover-redirectaddress-response.xml"))
    assert (moved.code, moved.redirect_target) == ("RedirectAddress", "elvin@mail.contoso.com")
    url = ews_discover.parse_response(fixture("autodiscover-redirecturl-response.xml"))
    assert (url.code, url.redirect_target) == (
        "RedirectUrl", "https://autodiscover-s.corp.test/autodiscover/autodiscover.svc")
    nobody = ews_discover.parse_response(fixture("autodiscover-invaliduser-response.xml"))
    assert nobody.code == "InvalidUser" and "nobody@corp.test" in nobody.message


@pytest.mark.parametrize("body", [b"<html>Not Found</html>", b"not xml at all",
                                  b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'])
def test_anything_else_is_not_an_answer(body: bytes) -> None:
    with pytest.raises(ValueError):
        ews_discover.parse_response(body)


def test_the_fakes_answers_have_the_documented_shape() -> None:
    settings = {"ExternalEwsUrl": "https://mail.corp.test/EWS/Exchange.asmx",
                "InternalEwsUrl": "https://exch01.corp.test/EWS/Exchange.asmx"}
    assert shape(user_response("NoError", "No error.", settings=settings)) == shape(
        fixture("autodiscover-getusersettings-response.xml"))
    ours = shape(user_response("RedirectUrl", "Redirection URL.", redirect_target="x"))
    documented = shape(fixture("autodiscover-redirecturl-response.xml"))
    assert set(documented) <= set(ours)  # ours also carries ServerVersionInfo


# ---------------------------------------------------------------- trust rule and logins


@pytest.mark.parametrize(("host", "inside"), [
    ("corp.test", True), ("autodiscover.corp.test", True), ("A.B.Corp.Test.", True),
    ("corp.test.evil.example", False), ("evilcorp.test", False), ("127.0.0.1", False),
    ("", False)])
def test_only_the_domain_and_its_subdomains_are_trusted(host: str, inside: bool) -> None:
    assert ews_discover.in_domain(host, "corp.test") is inside


def test_the_strongest_offered_login_is_used() -> None:
    auth = ews_discover._auth
    assert isinstance(auth('Negotiate, NTLM, Basic realm="x"', "u", "p"), HttpNtlmAuth)
    assert isinstance(auth('Digest realm="x", Basic realm="x"', "u", "p"),
                      requests.auth.HTTPDigestAuth)
    assert isinstance(auth('Basic realm="x"', "u", "p"), requests.auth.HTTPBasicAuth)
    assert auth('Bearer authorization_uri="https://login.example"', "u", "p") is None


# ---------------------------------------------------------------- the cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(ews_discover, "_clock", fake)
    ews_discover.clear()
    yield fake
    ews_discover.clear()


class Discoverer:
    """Counts calls; answers with `url` or raises `error`."""

    def __init__(self, url: str = "https://mail.corp.test/EWS/Exchange.asmx") -> None:
        self.url, self.error, self.calls = url, None, 0
        self.error: Exception | None

    def __call__(self) -> Found:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return Found(self.url, "https://autodiscover.corp.test/autodiscover/autodiscover.svc")


def failed() -> PermanentError:
    return PermanentError("EWS autodiscover for bob@corp.test found no EWS URL: …",
                          fix="set ews_url", code="autodiscover-failed")


def test_one_discovery_per_profile_and_domain(clock: Clock) -> None:
    run = Discoverer()
    first = ews_discover.lookup(KEY, run)
    carol = ews_discover.cache_key("imp", "Carol@Corp.Test", None, False)
    assert ews_discover.lookup(carol, run) is first
    assert run.calls == 1
    other = ews_discover.cache_key("imp", "dave@other.test", None, False)
    ews_discover.lookup(other, run)
    assert run.calls == 2


def test_an_answer_is_refreshed_after_an_hour(clock: Clock) -> None:
    run = Discoverer()
    ews_discover.lookup(KEY, run)
    clock.now += ews_discover.TTL_S - 1
    ews_discover.lookup(KEY, run)
    assert run.calls == 1
    clock.now += 2
    run.url = "https://mail2.corp.test/EWS/Exchange.asmx"
    assert ews_discover.lookup(KEY, run).ews_url == run.url
    assert run.calls == 2


def test_test_and_enable_takes_only_a_recent_answer(clock: Clock) -> None:
    run = Discoverer()
    ews_discover.lookup(KEY, run)
    clock.now += ews_discover.PROBE_MAX_AGE_S - 1
    ews_discover.lookup(KEY, run, max_age=ews_discover.PROBE_MAX_AGE_S)
    assert run.calls == 1
    clock.now += 2
    ews_discover.lookup(KEY, run, max_age=ews_discover.PROBE_MAX_AGE_S)
    assert run.calls == 2


def test_forget_drops_only_the_url_that_failed(clock: Clock) -> None:
    run = Discoverer()
    ews_discover.lookup(KEY, run)
    ews_discover.forget(KEY, "https://elsewhere.corp.test/EWS/Exchange.asmx")
    ews_discover.lookup(KEY, run)
    assert run.calls == 1
    ews_discover.forget(KEY, run.url)
    ews_discover.lookup(KEY, run)
    assert run.calls == 2


def test_a_domain_failure_is_shared_for_a_minute(clock: Clock) -> None:
    run = Discoverer()
    run.error = failed()
    for _ in range(3):
        with pytest.raises(PermanentError) as caught:
            ews_discover.lookup(KEY, run)
        assert caught.value.code == "autodiscover-failed" and caught.value.fix == "set ews_url"
    assert run.calls == 1
    clock.now += ews_discover.FAILURE_TTL_S + 1
    run.error = None
    assert ews_discover.lookup(KEY, run).ews_url == run.url
    assert run.calls == 2


def test_a_refused_login_is_never_shared(clock: Clock) -> None:
    run = Discoverer()
    run.error = AuthError("login of svc@corp.test was rejected (401)", code="auth-failed")
    for _ in range(2):
        with pytest.raises(AuthError):
            ews_discover.lookup(KEY, run)
    assert run.calls == 2


def test_runs_keep_the_last_good_url_when_a_refresh_finds_nothing(clock: Clock) -> None:
    run = Discoverer()
    good = ews_discover.lookup(KEY, run)
    clock.now += ews_discover.TTL_S + 1
    run.error = failed()
    assert ews_discover.lookup(KEY, run) is good  # a run carries on
    assert ews_discover.lookup(KEY, run) is good  # ... without asking again at once
    assert run.calls == 2
    with pytest.raises(PermanentError):  # Test & Enable reports what autodiscover says
        ews_discover.lookup(KEY, run, max_age=ews_discover.PROBE_MAX_AGE_S)
    clock.now += ews_discover.FAILURE_TTL_S + 1
    assert ews_discover.lookup(KEY, run) is good  # asked again a minute later
    assert run.calls == 4


def test_concurrent_mailboxes_wait_for_one_discovery(clock: Clock) -> None:
    started, release = threading.Event(), threading.Event()
    run = Discoverer()

    def slow() -> Found:
        started.set()
        release.wait(5)
        return run()

    results: list[Found] = []
    threads = [threading.Thread(target=lambda: results.append(ews_discover.lookup(KEY, slow)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    assert started.wait(5)
    release.set()
    for thread in threads:
        thread.join(5)
    assert run.calls == 1 and len(results) == 4 and len({id(r) for r in results}) == 1
