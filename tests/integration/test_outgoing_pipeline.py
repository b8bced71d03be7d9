"""The pipelined submission client (connectors.smtppipeline) and the send pipeline around it.

Against aiosmtpd servers on loopback (a RCPT refused, 4xx deferrals, a server that drops
the connection during DATA, one without PIPELINING) and against the real Postfix (bob
submits to dave and to an unknown local user in one pipelined transaction). The journal
rule is checked on the wire: the "submitting" mark has finished before the server sees the
first byte of the message content.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, Session

from serversync.connectors import smtp, smtppipeline
from serversync.connectors.net import ConnectOptions
from serversync.core.email import EmailStatus
from serversync.core.errors import AuthError, PermanentError
from serversync.core.model import AccessMode, Endpoint, TlsMode
from serversync.core.outgoing import Phase
from serversync.core.rules import Login
from serversync.core.secret import Secret
from serversync.services.outgoing import NewEmail, OutgoingService
from serversync.store.db import Database
from serversync.store.outgoing import OutgoingStore
from tests.integration.test_outgoing import BOB, DAVE, OWN, add_mailbox, settle
from tests.testservers import CA_FILE, HOST, SUBMISSION_PORT, wait_for_message

MESSAGE = (b"From: bob@example.test\r\nTo: dave@example.test\r\nSubject: pipe\r\n"
           b"Message-ID: <pipe-%d@example.test>\r\n\r\nline one\r\n.starts with a dot\r\n.\r\n"
           b"end\r\n")


class Handler:
    """Records transactions; refuses, defers or drops on request."""

    def __init__(self, *, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = "250 2.0.0 Ok: queued"
        self.drop_during_data = False
        self.data_started: list[float] = []  # when the content's first line arrived

    async def handle_EHLO(self, server: SMTPServer, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: SMTPServer, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.rcpt_replies.get(address, "250 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTPServer, session: Session,
                          envelope: Envelope) -> str:
        if self.drop_during_data:
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "250 never seen"
        content = envelope.original_content or b""
        if self.data_reply.startswith("250"):
            self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos), content))
        return self.data_reply


class _TimedServer(SMTPServer):
    """Notes when the first line of message content arrives (before it is all read)."""

    async def smtp_DATA(self, arg: str) -> None:
        original = self._reader.readuntil
        handler = self.event_handler

        async def first_line(separator: bytes = b"\n") -> bytes:
            line = await original(separator)
            handler.data_started.append(time.monotonic())
            self._reader.readuntil = original  # type: ignore[method-assign]
            return line

        self._reader.readuntil = first_line  # type: ignore[method-assign, assignment]
        try:
            await super().smtp_DATA(arg)
        finally:
            self._reader.readuntil = original  # type: ignore[method-assign]


class _Controller(Controller):
    def factory(self) -> SMTPServer:
        return _TimedServer(self.handler, **self.SMTP_kwargs)


def _accept(server: SMTPServer, session: Session, envelope: Envelope, mechanism: str,
            auth_data: Any) -> AuthResult:
    return AuthResult(success=getattr(auth_data, "password", b"") == b"pw", handled=False)


@pytest.fixture
def server() -> Iterator[tuple[Handler, int]]:
    handler = Handler()
    with socket.socket() as probe:  # a free port (aiosmtpd's start-up check needs a real one)
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    controller = _Controller(handler, hostname=HOST, port=port, authenticator=_accept,
                             auth_require_tls=False)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


LOGIN = Login(AccessMode.OWN, BOB, Secret("pw"), BOB)


async def open_client(port: int, login: Login = LOGIN) -> smtppipeline.SubmissionClient:
    return await smtppipeline.connect(Endpoint(HOST, port, TlsMode.NONE), login,
                                      ConnectOptions(timeout=10), local_hostname="client.test")


async def test_pipelined_one_rcpt_refused_and_dots_survive(server: tuple[Handler, int]) -> None:
    handler, port = server
    handler.rcpt_replies["nobody@example.test"] = "550 5.1.1 no such user"
    client = await open_client(port)
    assert client.supports_extension("pipelining")
    marked: list[float] = []

    async def mark() -> None:
        await asyncio.sleep(0.2)  # a slow journal: the content must wait for it
        marked.append(time.monotonic())

    result = await client.submit(BOB, ["nobody@example.test", DAVE], MESSAGE % 1,
                                 before_data=mark)
    assert result.refused == {"nobody@example.test": (550, "5.1.1 no such user")}
    assert list(result.accepted) == [DAVE] and result.reply.startswith("2.0.0")
    assert handler.messages[0][1] == [DAVE]
    assert handler.messages[0][2] == MESSAGE % 1  # dot-stuffing undone by the server
    assert marked and handler.data_started and marked[0] <= handler.data_started[0]
    # the session goes on: a second transaction on the same connection
    await client.submit(BOB, [DAVE], MESSAGE % 2)
    assert len(handler.messages) == 2
    await client.close()


async def test_every_rcpt_refused_or_deferred(server: tuple[Handler, int]) -> None:
    handler, port = server
    client = await open_client(port)
    handler.rcpt_replies[DAVE] = "550 5.1.1 no such user"
    with pytest.raises(smtp.MessageRefused) as refused:
        await client.submit(BOB, [DAVE], MESSAGE % 3)
    assert refused.value.refused == {DAVE: (550, "5.1.1 no such user")}
    handler.rcpt_replies[DAVE] = "450 4.2.0 mailbox busy"
    with pytest.raises(smtp.MessageDeferred) as deferred:
        await client.submit(BOB, [DAVE], MESSAGE % 4)
    assert deferred.value.reply_code == 450
    del handler.rcpt_replies[DAVE]
    await client.submit(BOB, [DAVE], MESSAGE % 5)  # still in step with the server
    assert [m[2] for m in handler.messages] == [MESSAGE % 5]
    await client.close()


async def test_deferred_after_data_and_sender_not_owned(server: tuple[Handler, int]) -> None:
    handler, port = server
    client = await open_client(port)
    handler.data_reply = "451 4.3.0 try again later"
    with pytest.raises(smtp.MessageDeferred, match="451"):
        await client.submit(BOB, [DAVE], MESSAGE % 6)
    handler.data_reply = "250 ok"
    handler.rcpt_replies[DAVE] = "553 5.7.1 <bob@example.test>: Sender address rejected: " \
                                 "not owned by user"
    with pytest.raises(PermanentError) as exc:
        await client.submit(BOB, [DAVE], MESSAGE % 7)
    assert exc.value.code == "sender-not-owned"
    await client.close()


async def test_connection_lost_during_data_is_outcome_unknown(
        server: tuple[Handler, int]) -> None:
    handler, port = server
    client = await open_client(port)
    handler.drop_during_data = True
    with pytest.raises(smtp.OutcomeUnknown):
        await client.submit(BOB, [DAVE], MESSAGE % 8)
    assert not client.is_connected


async def test_failed_mark_sends_no_content(server: tuple[Handler, int]) -> None:
    handler, port = server
    client = await open_client(port)

    async def broken_journal() -> None:
        raise RuntimeError("database is gone")

    with pytest.raises(RuntimeError, match="database is gone"):
        await client.submit(BOB, [DAVE], MESSAGE % 9, before_data=broken_journal)
    assert not client.is_connected  # dropped after 354: the server discards it
    await asyncio.sleep(0.2)
    assert handler.messages == [] and handler.data_started == []


async def test_server_without_pipelining_is_driven_in_lockstep(
        server: tuple[Handler, int]) -> None:
    handler, port = server
    handler.pipelining = False
    handler.rcpt_replies["nobody@example.test"] = "550 5.1.1 no such user"
    client = await open_client(port)
    assert not client.supports_extension("pipelining")
    calls: list[str] = []

    async def mark() -> None:
        calls.append("mark")

    result = await client.submit(BOB, [DAVE, "nobody@example.test"], MESSAGE % 10,
                                 before_data=mark)
    assert calls == ["mark"] and list(result.accepted) == [DAVE]
    assert handler.messages[0][1] == [DAVE]
    await client.close()


async def test_wrong_password_is_an_auth_error(server: tuple[Handler, int]) -> None:
    _, port = server
    with pytest.raises(AuthError) as exc:
        await open_client(port, Login(AccessMode.OWN, BOB, Secret("wrong"), BOB))
    assert exc.value.code == "auth-failed"


# ---------------------------------------------------------------- real Postfix


async def test_pipelined_submit_through_postfix(test_servers: object) -> None:
    client = await smtppipeline.connect(
        Endpoint(HOST, SUBMISSION_PORT, TlsMode.STARTTLS),
        Login(AccessMode.OWN, BOB, Secret("bob-pw"), BOB),
        ConnectOptions(ca_file=str(CA_FILE)), local_hostname="client.test")
    try:
        assert client.supports_extension("pipelining")
        stamp = time.time_ns()
        result = await client.submit(BOB, ["no-such-user@example.test", DAVE],
                                     MESSAGE.replace(b"pipe-%d", b"pipe-%d" % stamp))
        assert list(result.accepted) == [DAVE]
        code, text = result.refused["no-such-user@example.test"]
        assert code == 550 and "5.1.1" in text
    finally:
        await client.close()
    assert settle(DAVE, f"<pipe-{stamp}@example.test>") == 1


async def test_email_marked_ahead_and_not_sent_goes_back_to_pending(
        sqlite_db: Database, test_servers: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel failure while the next email is already journaled: it was never sent."""
    await add_mailbox(sqlite_db, OWN, BOB)
    service = OutgoingService(sqlite_db, max_sessions=1)
    emails = [await service.create(NewEmail(BOB, f"ahead {i}", to=[DAVE], text="x"))
              for i in range(3)]
    real_submit = smtppipeline.SubmissionClient.submit
    calls = 0

    async def submit(self: smtppipeline.SubmissionClient, *args: Any, **kwargs: Any,
                     ) -> smtp.Submission:
        nonlocal calls
        calls += 1
        if calls == 2:  # the server stops accepting this sender mid-run
            raise PermanentError("553 sender not owned", code="sender-not-owned")
        return await real_submit(self, *args, **kwargs)

    monkeypatch.setattr(smtppipeline.SubmissionClient, "submit", submit)
    with pytest.raises(PermanentError):
        await service(BOB)
    states = [await service.state(e.id or 0) for e in emails]
    assert [s.status for s in states] == [EmailStatus.SENT, EmailStatus.FAILED,
                                          EmailStatus.PENDING_SEND]
    # the third was journaled "submitting" while the second was on the wire, then put back
    assert states[2].phase is Phase.QUEUED and states[2].attempts == 0
    async with sqlite_db.transaction() as repo:
        assert await OutgoingStore(repo.session).due_count(BOB, dt.datetime.now(dt.UTC)) == 1
    monkeypatch.setattr(smtppipeline.SubmissionClient, "submit", real_submit)
    await service(BOB)
    assert (await service.state(emails[2].id or 0)).status is EmailStatus.SENT
    assert settle(DAVE, emails[2].message_id or "") == 1
    wait_for_message(DAVE, emails[0].message_id or "")



async def test_one_run_claims_chunk_after_chunk_up_to_its_batch_size(
        sqlite_db: Database, test_servers: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from serversync.services import outgoing

    monkeypatch.setattr(outgoing, "CLAIM_CHUNK", 2)
    await add_mailbox(sqlite_db, OWN, BOB)
    service = OutgoingService(sqlite_db, batch_size=5)
    emails = [await service.create(NewEmail(BOB, f"chunk {i}", to=[DAVE], text="x"))
              for i in range(7)]
    first = await service(BOB)
    assert (first.items, first.more) == (5, True)  # three chunks (2 + 2 + 1), same run
    second = await service(BOB)
    assert (second.items, second.more) == (2, False)
    for created in emails:
        assert (await service.state(created.id or 0)).status is EmailStatus.SENT
    assert settle(DAVE, emails[-1].message_id or "") == 1

