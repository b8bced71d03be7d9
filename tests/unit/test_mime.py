"""The MIME parser: fields, degradation, the malformed corpus, and a hypothesis fuzz."""

from __future__ import annotations

import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serversync.connectors import mime
from serversync.connectors.imap import parse_fetch, uid_set
from serversync.core.email import Role
from serversync.core.errors import ItemError
from tests.corpus import malformed_corpus

GOOD = (b"From: Olga <OLGA@customer.test>\r\nTo: a@x.test, B <b@y.test>\r\nCc: c@z.test\r\n"
        b"Reply-To: r@x.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"Message-ID: <m1@x>\r\nIn-Reply-To: <p1@x>\r\nReferences: <p0@x> <p1@x>\r\n"
        b"Thread-Index: AdSm6fAwqg7n7Dq6QIOIbLmRzfhyQwAAAAAB\r\n"
        b"Date: Mon, 1 Jan 2024 10:00:00 +0100\r\n"
        b'Content-Type: multipart/mixed; boundary="X"\r\n\r\n--X\r\n'
        b'Content-Type: multipart/alternative; boundary="Y"\r\n\r\n--Y\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nplain\r\n--Y\r\n"
        b"Content-Type: text/html\r\n\r\n<p onclick=x()>hi<script>bad()</script></p>\r\n"
        b"--Y--\r\n--X\r\nContent-Type: application/pdf; name=a.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--X--\r\n")


def check(parsed: mime.ParsedMessage) -> None:
    assert parsed.subject == "Grüße" and parsed.sender == "olga@customer.test"
    roles = [(r.role, r.address) for r in parsed.recipients]
    assert (Role.TO, "b@y.test") in roles and (Role.CC, "c@z.test") in roles
    assert (Role.REPLY_TO, "r@x.test") in roles
    assert parsed.message_id == "<m1@x>" and parsed.in_reply_to == "<p1@x>"
    assert parsed.references == ("<p0@x>", "<p1@x>")
    assert parsed.conversation_id and parsed.conversation_id.startswith("thread-index:")
    assert parsed.sent_at == dt.datetime(2024, 1, 1, 9, tzinfo=dt.UTC)
    assert parsed.body_text.strip() == "plain"
    assert "script" not in parsed.body_html and "onclick" not in parsed.body_html
    [att] = parsed.attachments
    assert (att.name, att.content_type, att.content, att.size) == (
        "a.pdf", "application/pdf", b"hello", 5)


def test_fast_and_fallback_agree() -> None:
    check(mime.parse(GOOD))
    fallback = mime.parse_stdlib(GOOD, 10**9)
    check(fallback)


def test_attachment_over_the_limit_is_recorded_not_stored() -> None:
    [att] = mime.parse(GOOD, max_attachment_bytes=3).attachments
    assert att.content is None and att.size == 5 and "limit" in att.notice


def test_corpus_never_raises_anything_but_item_error() -> None:
    results = mime.parse_batch([raw for _, raw in malformed_corpus(big_mb=1)],
                               max_attachment_bytes=512 * 1024)
    by_name = dict(zip([n for n, _ in malformed_corpus(big_mb=1)], results, strict=True))
    assert all(isinstance(r, mime.ParsedMessage | ItemError) for r in results)
    ok = {n: r for n, r in by_name.items() if isinstance(r, mime.ParsedMessage)}
    assert "bad-date" in ok and ok["bad-date"].sent_at is None
    assert any("Date" in n for n in ok["bad-date"].notices)
    assert "\x00" not in ok["nul-bytes"].subject + ok["nul-bytes"].body_text
    assert "script" not in ok["html-script"].body_html
    assert ok["8bit-headers"].sender == "joerg@customer.test"
    assert ok["big-attachment"].attachments[-1].content is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    try:
        parsed = mime.parse(raw)
    except ItemError:
        return
    assert isinstance(parsed.subject, str) and isinstance(parsed.body_text, str)
    assert len(parsed.content_hash) == 64


_header = st.sampled_from([b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID",
                           b"Content-Type", b"Content-Transfer-Encoding", b"References"])
_value = st.one_of(st.binary(max_size=60), st.sampled_from([
    b"multipart/mixed; boundary=Q", b"text/plain; charset=x-bogus", b"base64",
    b"quoted-printable", b"=?utf-8?b?w6k=?=", b"<a@b>", b"a@b, <c@d>, ;;;", b"\xff\xfe"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_header, _value), max_size=12),
       st.lists(st.sampled_from([b"--Q\r\n", b"--Q--\r\n", b"Content-Type: text/html\r\n",
                                 b"\r\n", b"=E9=\r\n", b"aGk=\r\n", b"\xe9\x00\r\n"]),
                max_size=20))
def test_fuzz_structured_messages(headers: list[tuple[bytes, bytes]], body: list[bytes]) -> None:
    raw = b"".join(h + b": " + v + b"\r\n" for h, v in headers) + b"\r\n" + b"".join(body)
    [result] = mime.parse_batch([raw])
    assert isinstance(result, mime.ParsedMessage | ItemError)
    if isinstance(result, mime.ParsedMessage):
        assert all("\x00" not in r.address for r in result.recipients)


def test_uid_set_and_fetch_parser() -> None:
    assert uid_set([1, 2, 3, 5, 7, 8]) == b"1:3,5,7:8"
    assert uid_set([4]) == b"4"
    fast = [[(b'* 1 FETCH (UID 10 INTERNALDATE "01-Jan-2024 10:00:00 +0000" BODY[] {3}',
              b"abc"), b")"]]
    [(uid, body, when)] = parse_fetch(fast)
    assert (uid, body) == (10, b"abc") and when == dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)
    odd = [[(b"* 2 FETCH (BODY[] {3}", b"xyz"), b' UID 11 FLAGS (\\Seen))']]
    assert [(u, b) for u, b, _ in parse_fetch(odd)] == [(11, b"xyz")]
    assert parse_fetch([[b"* 3 EXPUNGE"]]) == []
