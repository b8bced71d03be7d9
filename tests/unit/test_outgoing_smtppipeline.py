"""DATA content framing of the pipelined submission client (RFC 5321 §4.5.2)."""

from __future__ import annotations

from serversync.connectors.smtppipeline import data_payload


def test_lines_end_in_crlf_and_leading_dots_are_doubled() -> None:
    assert data_payload(b".a\nb\r\n.\r\nc") == b"..a\r\nb\r\n..\r\nc\r\n.\r\n"


def test_a_clean_message_is_only_terminated() -> None:
    assert data_payload(b"a\r\nb\r\n") == b"a\r\nb\r\n.\r\n"
    assert data_payload(b"") == b"\r\n.\r\n"
