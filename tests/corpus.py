"""A corpus of malformed messages, each one a way real mail breaks parsers.

Used by the integration test (every message must end tracked or quarantined, never lost)
and by the parser's unit tests. Each entry is (name, raw bytes).
"""

from __future__ import annotations

import base64
import email.utils


def _mid(name: str) -> str:
    return f"Message-ID: <{name}.{email.utils.make_msgid()[1:-1]}>\r\n"


def malformed_corpus(big_mb: int = 50) -> list[tuple[str, bytes]]:
    head = "From: Olga <olga@customer.test>\r\nTo: alice@example.test\r\n"
    date = f"Date: {email.utils.formatdate()}\r\n"
    nested = (head + date + _mid("inner") + "Subject: inner\r\n\r\ninner body\r\n").encode()
    big = base64.encodebytes(b"\x00\x01binary" * (big_mb * 1024 * 1024 // 8)).replace(
        b"\n", b"\r\n")
    deep = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
                   for i in range(300))
    return [
        ("broken-boundary", (head + date + _mid("bb") + "Subject: broken boundary\r\n"
         'Content-Type: multipart/mixed; boundary="AAA"\r\n\r\n--BBB\r\nContent-Type: '
         "text/plain\r\n\r\nlost boundary\r\n--AAA\r\nContent-Type: text/plain\r\n\r\n"
         "never closed\r\n").encode()),
        ("bad-charset", (head + date + _mid("cs") + "Subject: bad charset\r\nContent-Type: "
         "text/plain; charset=x-no-such-charset\r\n\r\n").encode() + b"caf\xe9 \xff\xfe\r\n"),
        ("lying-charset", (head + date + _mid("lie") + "Subject: lying charset\r\n"
         "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode() + b"caf\xe9 na\xefve\r\n"),
        ("bad-date", (head + "Date: the day after tomorrow, 99:99\r\n" + _mid("bd")
         + "Subject: bad date\r\n\r\nbody\r\n").encode()),
        ("missing-headers", b"\r\njust a body, no headers at all\r\n"),
        ("only-headers", (head + date + _mid("oh") + "Subject: no body").encode()),
        ("8bit-headers", (date + _mid("8b")).encode()
         + "From: Jörg Müller <joerg@customer.test>\r\nTo: alice@example.test\r\nSubject: "
           "Grüße – ünïcödé\r\n\r\nbody\r\n".encode() + b"X-Latin: caf\xe9\r\n"),
        ("nested-rfc822", (head + date + _mid("nr") + "Subject: forwarded\r\nContent-Type: "
         'multipart/mixed; boundary="X"\r\n\r\n--X\r\nContent-Type: text/plain\r\n\r\nsee '
         "attached\r\n--X\r\nContent-Type: message/rfc822\r\n\r\n").encode() + nested
         + b"\r\n--X--\r\n"),
        ("huge-header", (head + date + _mid("hh") + "Subject: huge header\r\nX-Huge: "
         + "a" * 200_000 + "\r\n" + "".join(f"X-Many-{i}: v\r\n" for i in range(2000))
         + "\r\nbody\r\n").encode()),
        ("bad-base64", (head + date + _mid("b64") + "Subject: bad base64\r\nContent-Type: "
         'multipart/mixed; boundary="Y"\r\n\r\n--Y\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
         "--Y\r\nContent-Type: application/pdf; name=x.pdf\r\nContent-Transfer-Encoding: "
         "base64\r\n\r\n!!!not base64 at all***\r\n--Y--\r\n").encode()),
        ("nul-bytes", (head + date + _mid("nul") + "Subject: nul\x00bytes\r\n\r\n").encode()
         + b"a\x00b\x00c\r\n"),
        ("html-script", (head + date + _mid("html") + "Subject: html\r\nContent-Type: "
         "text/html\r\n\r\n<p onclick='x()'>hi<script>alert(1)</script></p>\r\n").encode()),
        ("deep-nesting", (head + date + _mid("deep") + "Subject: deep\r\n" + deep
         + "Content-Type: text/plain\r\n\r\nbottom\r\n").encode()),
        ("big-attachment", (head + date + _mid("big") + "Subject: 50 MB attachment\r\n"
         'Content-Type: multipart/mixed; boundary="Z"\r\n\r\n--Z\r\nContent-Type: text/plain'
         "\r\n\r\nsee attachment\r\n--Z\r\nContent-Type: application/octet-stream; "
         "name=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode() + big
         + b"\r\n--Z--\r\n"),
    ]
