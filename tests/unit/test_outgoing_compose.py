"""Building outgoing messages (core.compose) and the lifecycle arithmetic (core.outgoing)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from email.message import EmailMessage

import pytest

from serversync.core.compose import ComposeError, compose, make_message_id, text_from_html
from serversync.core.email import (
    Attachment,
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
    Role,
)
from serversync.core.outgoing import BACKOFF_CAP, Priority, backoff, due_at

DATE = dt.datetime(2025, 3, 7, 14, 3, 9, tzinfo=dt.UTC)
MID = "<0123abcd@example.test>"


def activity(**changes: object) -> EmailActivity:
    base = EmailActivity(
        direction=Direction.OUTGOING, status=EmailStatus.PENDING_SEND,
        subject="Angebot für Ärzte", sender="bob@example.test",
        recipients=(Recipient(Role.FROM, "bob@example.test", "Bob Bäcker"),
                    Recipient(Role.TO, "dave@example.test", "Dave Dürr"),
                    Recipient(Role.CC, "friend@gmail.example"),
                    Recipient(Role.BCC, "boss@example.test", "The Boss")),
        message_id=MID, tracking_token="[SSY:000042]", body_text="Grüße\n",
        body_html="<p>Grüße <b>von</b> Bob</p>", id=42)
    fields = {**{f: getattr(base, f) for f in base.__dataclass_fields__}, **changes}
    return EmailActivity(**fields)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_headers_alternative_and_token() -> None:
    built = compose(activity(), date=DATE, smtputf8_offered=False)
    msg = parse(built.raw)
    assert msg["Message-ID"] == MID
    assert msg["Subject"] == "Angebot für Ärzte [SSY:000042]"
    assert b"=?utf-8?" in built.raw.split(b"\r\n\r\n", 1)[0]  # RFC 2047, 7-bit headers
    assert built.raw.isascii()
    assert msg["From"].addresses[0].display_name == "Bob Bäcker"
    assert str(msg["To"]) == "Dave Dürr <dave@example.test>"
    assert "Bcc" not in msg
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.replace("\r\n", "\n") == "Grüße\n"  # canonical CRLF inside base64
    assert "von" in msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert built.recipients == ("dave@example.test", "friend@gmail.example", "boss@example.test")
    assert msg["Date"] == "Fri, 07 Mar 2025 14:03:09 +0000"
    assert not built.smtputf8


def test_bcc_only_in_the_sent_copy() -> None:
    built = compose(activity(), date=DATE, smtputf8_offered=False)
    copy = parse(built.sent_copy)
    assert str(copy["Bcc"]) == "The Boss <boss@example.test>"
    assert built.sent_copy.endswith(built.raw)


def test_rebuilding_gives_identical_bytes() -> None:
    with_file = activity(attachments=(Attachment("a.pdf", "application/pdf", 3, b"%PD"),))
    first = compose(with_file, date=DATE, smtputf8_offered=False)
    second = compose(with_file, date=DATE, smtputf8_offered=False)
    assert first.raw == second.raw
    assert b"=_ss_mix_" in first.raw and b"=_ss_alt_" in first.raw


def test_attachments_with_non_ascii_names_use_rfc2231() -> None:
    files = (Attachment("Größe €.pdf", "application/pdf", 4, b"%PDF"),
             Attachment("liste.csv", "text/csv", 4, b"a,b\n"))
    raw = compose(activity(attachments=files), date=DATE, smtputf8_offered=False).raw
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_attachments())
    assert [p.get_filename() for p in parts] == ["Größe €.pdf", "liste.csv"]
    assert b"filename*=utf-8''Gr%C3%B6%C3%9Fe%20%E2%82%AC.pdf" in raw
    assert parts[0].get_content() == b"%PDF"
    assert parts[1].get_content_type() == "text/csv"


def test_inline_image_goes_into_multipart_related() -> None:
    logo = Attachment("logo.png", "image/png", 3, b"PNG", content_id="logo1")
    msg = parse(compose(activity(attachments=(logo,)), date=DATE, smtputf8_offered=False).raw)
    html = msg.get_body(("related",))
    assert html is not None and html.get_content_type() == "multipart/related"
    image = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo1>"


def test_attachment_without_content_refuses_to_build() -> None:
    lost = Attachment("big.iso", "application/octet-stream", 10, None, notice="too big")
    with pytest.raises(ComposeError, match="big.iso"):
        compose(activity(attachments=(lost,)), date=DATE, smtputf8_offered=False)


def test_reply_headers() -> None:
    reply = activity(in_reply_to="<parent@x.example>",
                     references=("<root@x.example>", "<parent@x.example>"))
    msg = parse(compose(reply, date=DATE, smtputf8_offered=False).raw)
    assert msg["In-Reply-To"] == "<parent@x.example>"
    assert msg["References"] == "<root@x.example> <parent@x.example>"


def test_delegation_sets_sender_header() -> None:
    msg = parse(compose(activity(), date=DATE, smtputf8_offered=False,
                        on_behalf_of="delegate@example.test").raw)
    assert str(msg["Sender"]) == "delegate@example.test"
    assert msg["From"].addresses[0].addr_spec == "bob@example.test"


def test_priority_headers() -> None:
    msg = parse(compose(activity(), date=DATE, smtputf8_offered=False,
                        priority=Priority.HIGH).raw)
    assert msg["Importance"] == "high" and msg["X-Priority"].startswith("1")


def test_non_ascii_local_part_needs_smtputf8() -> None:
    eai = activity(recipients=(Recipient(Role.TO, "dave@example.test"),
                               Recipient(Role.TO, "jörg@bücher.example")))
    without = compose(eai, date=DATE, smtputf8_offered=False)
    assert without.recipients == ("dave@example.test",)
    assert "SMTPUTF8" in without.unreachable["jörg@bücher.example"]
    assert "jörg" not in str(parse(without.raw)["To"])
    with_utf8 = compose(eai, date=DATE, smtputf8_offered=True)
    assert with_utf8.smtputf8
    assert with_utf8.recipients == ("dave@example.test", "jörg@bücher.example")
    assert "jörg@bücher.example".encode() in with_utf8.raw  # RFC 6532 UTF-8 header


def test_non_ascii_domain_uses_idna_without_smtputf8() -> None:
    idn = activity(recipients=(Recipient(Role.TO, "info@bücher.example"),))
    built = compose(idn, date=DATE, smtputf8_offered=True)
    assert not built.smtputf8  # an IDNA domain does not need the extension
    assert built.recipients == ("info@xn--bcher-kva.example",)
    assert "info@xn--bcher-kva.example" in str(parse(built.raw)["To"])


def test_non_ascii_sender_without_smtputf8_fails() -> None:
    with pytest.raises(ComposeError, match="SMTPUTF8"):
        compose(activity(sender="jörg@example.test"), date=DATE, smtputf8_offered=False)


def test_html_only_gets_a_text_part() -> None:
    msg = parse(compose(activity(body_text="", body_html="<p>Hello<br>there</p><script>x()"
                                 "</script>"), date=DATE, smtputf8_offered=False).raw)
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Hello\nthere" in text and "x()" not in text
    assert text_from_html("<div>a</div><div>b</div>").split() == ["a", "b"]


def test_message_id_uses_the_sender_domain() -> None:
    assert make_message_id("bob@example.test", "abc") == "<abc@example.test>"
    assert make_message_id("bob@bücher.example", "abc") == "<abc@xn--bcher-kva.example>"


def test_backoff_doubles_up_to_the_cap_and_honours_the_server() -> None:
    assert [backoff(n).total_seconds() for n in (1, 2, 3)] == [60, 120, 240]
    assert backoff(30) == BACKOFF_CAP
    assert backoff(1, retry_after=900).total_seconds() == 900
    assert backoff(3, retry_after=5).total_seconds() == 240


def test_due_at_is_the_latest_constraint() -> None:
    later = DATE + dt.timedelta(hours=2)
    assert due_at(DATE, None, None) == DATE
    assert due_at(DATE, later, None) == later
    assert due_at(DATE, None, later + dt.timedelta(1)) == later + dt.timedelta(1)


def test_8bit_bodies_when_offered_and_long_headers_folded() -> None:
    many = tuple(Recipient(Role.TO, f"person{i}@example.test", f"Pérson {i}") for i in range(8))
    long_subject = "Überweisung " * 12
    built = compose(activity(recipients=many, subject=long_subject), date=DATE,
                    smtputf8_offered=False, eightbit_offered=True)
    head = built.raw.partition(b"\r\n\r\n")[0]
    assert head.isascii() and all(len(line) <= 998 for line in built.raw.split(b"\r\n"))
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert b"Content-Transfer-Encoding: 8bit" in built.raw and "Grüße".encode() in built.raw
    msg = parse(built.raw)
    assert msg["Subject"] == long_subject.strip() + " [SSY:000042]" or \
        msg["Subject"] == f"{long_subject} [SSY:000042]"
    assert [a.addr_spec for a in msg["To"].addresses] == [r.address for r in many]
    assert msg["To"].addresses[3].display_name == "Pérson 3"


def test_utf8_names_with_utf8_addresses() -> None:
    eai = activity(recipients=(Recipient(Role.FROM, "bob@example.test", "Bob Bäcker"),
                               Recipient(Role.TO, "jörg@bücher.example", "Jörg, der Bücher")))
    built = compose(eai, date=DATE, smtputf8_offered=True)
    msg = email.message_from_string(built.raw.decode("utf-8").replace("\r\n", "\n"),
                                    policy=email.policy.default)
    assert msg["To"].addresses[0].display_name == "Jörg, der Bücher"
    assert msg["To"].addresses[0].addr_spec == "jörg@bücher.example"


def test_unexpressible_activity_is_a_compose_error() -> None:
    broken = activity(recipients=(Recipient(Role.TO, "dave@example.test"),),
                      in_reply_to="<a@b>", attachments=(
                          Attachment("x", "application/pdf", 1, "not bytes"),))  # type: ignore[arg-type]
    with pytest.raises(ComposeError, match="cannot be built"):
        compose(broken, date=DATE, smtputf8_offered=False)


def test_long_file_names_are_continued_and_quoted_names_escaped() -> None:
    long_name = "Überweisungsbestätigung für die Rechnung Nummer 2025-000123 (Kopie).pdf"
    files = (Attachment(long_name, "application/pdf", 4, b"%PDF"),
             Attachment('say "hi".txt', "text/plain", 2, b"hi"),
             Attachment("odd", "not a type", 1, b"x"))
    raw = compose(activity(attachments=files), date=DATE, smtputf8_offered=False).raw
    head = raw.partition(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in raw.split(b"\r\n") if b"filename" in line), head
    assert b"filename*0*=utf-8''" in raw and b"filename*1*=" in raw
    parts = list(parse(raw).iter_attachments())
    assert [p.get_filename() for p in parts] == [long_name, 'say "hi".txt', "odd"]
    assert parts[2].get_content_type() == "application/octet-stream"
    assert parts[1].get_content() == "hi"


def test_line_break_in_a_header_fails_instead_of_injecting() -> None:
    with pytest.raises(ComposeError, match="line break"):
        compose(activity(subject="Hello\r\nBcc: victim@example.test"), date=DATE,
                smtputf8_offered=False)


def test_bare_newlines_become_crlf_and_long_lines_base64() -> None:
    built = compose(activity(body_text="a\nb\rc\r\n" + "x" * 1200 + "\n", body_html=""),
                    date=DATE, smtputf8_offered=False, eightbit_offered=True)
    assert b"\n" not in built.raw.replace(b"\r\n", b"")
    assert b"Content-Transfer-Encoding: base64" in built.raw
    text = parse(built.raw).get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.replace("\r\n", "\n").startswith("a\nb\nc\n" + "x" * 1200)
