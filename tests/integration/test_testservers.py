"""Self-test of the loopback test servers and of the helpers in tests/testservers.py.

Run: python -m pytest tests/integration/test_testservers.py -p tests.testservers
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import ssl
import uuid
from email.message import EmailMessage

import pytest

from tests.testservers import (
    DAV_PORT,
    DELEGATE,
    DOMAIN,
    HOST,
    HOST6,
    HOST_MISMATCH,
    IMAPS_PORT,
    POP3_PORT,
    POP3S_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    SVC,
    USERS,
    dav_request,
    deliver,
    deliver_lmtp,
    fill_maildir,
    imap_login,
    master_login,
    quote,
    reset_dav,
    reset_mailbox,
    set_acl,
    ssl_context,
    wait_for_message,
)

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("test_servers")]

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"


def make_message(frm: str, to: str, subject: str = "test") -> tuple[str, bytes]:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = frm, to, subject
    msg["Message-ID"] = mid = f"<{uuid.uuid4().hex}@serversync.test>"
    msg.set_content("hello\n")
    return mid, msg.as_bytes()


def search_mid(conn: imaplib.IMAP4, mid: str) -> list[bytes]:
    typ, data = conn.uid("SEARCH", "HEADER", "Message-ID", quote(mid))
    assert typ == "OK", data
    uids: list[bytes] = data[0].split()
    return uids


# ---------------------------------------------------------------- IMAP / POP3


def test_imap_starttls_and_imaps_verify_the_certificate() -> None:
    for tls in ("starttls", "ssl"):
        conn = imap_login(ALICE, tls=tls)
        assert conn.state == "AUTH"
        conn.logout()


def test_imap_over_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        conn = imap_login(ALICE, host=HOST6)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    conn.logout()


def test_tls_to_127_0_0_2_fails_host_name_verification() -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        imaplib.IMAP4_SSL(HOST_MISMATCH, IMAPS_PORT, ssl_context=ssl_context(), timeout=10)
    assert "mismatch" in str(err.value)
    # the same server is fine when host names are not checked: only the name is wrong
    ctx = ssl_context()
    ctx.check_hostname = False
    imaplib.IMAP4_SSL(HOST_MISMATCH, IMAPS_PORT, ssl_context=ctx, timeout=10).logout()


def test_svc_impersonates_bob_with_master_user_suffix() -> None:
    reset_mailbox(BOB)
    mid = deliver_lmtp(BOB, make_message("x@external.test", BOB)[1])
    conn = imap_login(f"{BOB}*{SVC}", USERS[SVC])
    try:
        assert conn.select("INBOX")[0] == "OK"
        assert len(search_mid(conn, mid)) == 1
    finally:
        conn.logout()


def test_svc_impersonates_bob_with_sasl_plain_authzid() -> None:
    reset_mailbox(BOB)
    mid = deliver_lmtp(BOB, make_message("x@external.test", BOB)[1])
    conn = imaplib.IMAP4(HOST, 10143, timeout=10)
    try:
        typ, _ = conn.authenticate("PLAIN", lambda _: f"{BOB}\0{SVC}\0{USERS[SVC]}".encode())
        assert typ == "OK"
        conn.select("INBOX")
        assert len(search_mid(conn, mid)) == 1
    finally:
        conn.logout()


def test_non_master_user_cannot_impersonate() -> None:
    conn = imaplib.IMAP4(HOST, 10143, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login(f"{BOB}*{ALICE}", USERS[ALICE])
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.authenticate("PLAIN", lambda _: f"{BOB}\0{ALICE}\0{USERS[ALICE]}".encode())
        # the delegation account is not a master user either
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login(f"{BOB}*{DELEGATE}", USERS[DELEGATE])
    finally:
        conn.shutdown()


def shared_select(user: str, mailbox: str) -> tuple[str, list[str]]:
    """SELECT in a NEW session: an open Dovecot session keeps the ACL view it had."""
    conn = imap_login(user)
    try:
        typ, _ = conn.select(quote(mailbox), readonly=True)
        rights = conn.myrights(quote(mailbox))[1][0].split()[-1].decode() if typ == "OK" else ""
        return typ, [rights]
    finally:
        conn.logout()


def test_delegation_through_shared_namespace_needs_an_acl() -> None:
    reset_mailbox(ALICE)  # also removes ACLs from earlier runs
    mid = deliver_lmtp(ALICE, make_message("x@external.test", ALICE)[1])
    shared_inbox = f"shared/{ALICE}/INBOX"
    assert shared_select(DELEGATE, shared_inbox)[0] == "NO"
    set_acl(ALICE, "INBOX", DELEGATE, "lrs")
    try:
        assert shared_select(DELEGATE, shared_inbox) == ("OK", ["lrs"])
        assert shared_select(f"carol@{DOMAIN}", shared_inbox)[0] == "NO"
        conn = imap_login(DELEGATE)
        try:
            conn.select(quote(shared_inbox), readonly=True)
            assert len(search_mid(conn, mid)) == 1
            # the owner's INBOX is also listed under the bare prefix
            typ, data = conn.list('""', quote("shared/*"))
            listed = b"\n".join(d for d in data if isinstance(d, bytes))
            assert typ == "OK" and f"shared/{ALICE}".encode() in listed, data
        finally:
            conn.logout()
    finally:
        set_acl(ALICE, "INBOX", DELEGATE, "")
    assert shared_select(DELEGATE, shared_inbox)[0] == "NO"


def test_pop3_login_plain_and_tls() -> None:
    pop = poplib.POP3(HOST, POP3_PORT, timeout=10)
    pop.user(ALICE)
    pop.pass_(USERS[ALICE])
    pop.stat()
    pop.quit()
    pops = poplib.POP3_SSL(HOST, POP3S_PORT, context=ssl_context(), timeout=10)
    pops.user(f"{ALICE}*{SVC}")  # impersonation works on POP3 too
    pops.pass_(USERS[SVC])
    pops.quit()


def test_fill_maildir_and_reset_mailbox() -> None:
    reset_mailbox(ALICE)
    msgs = [make_message("x@external.test", ALICE, f"m{i}")[1] for i in range(3)]
    assert fill_maildir(ALICE, "Archive/2024", msgs, flags="S") == 3
    conn = master_login(ALICE)
    try:
        typ, data = conn.select(quote("Archive/2024"), readonly=True)
        assert (typ, data[0]) == ("OK", b"3")
        assert conn.uid("SEARCH", "UNSEEN")[1][0] == b""
        conn.close()
    finally:
        conn.logout()
    reset_mailbox(ALICE)
    conn = master_login(ALICE)
    try:
        assert conn.select(quote("Archive/2024"))[0] == "NO"
        assert conn.select("INBOX")[1][0] == b"0"
    finally:
        conn.logout()


# ---------------------------------------------------------------- Postfix


def submit(login: str, mail_from: str, to: str, *, port: int = SUBMISSION_PORT) -> str:
    mid, raw = make_message(mail_from, to)
    if port == SUBMISSIONS_PORT:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(HOST, port, context=ssl_context(), timeout=10)
    else:
        smtp = smtplib.SMTP(HOST, port, timeout=10)
        smtp.starttls(context=ssl_context())
    with smtp:
        smtp.login(login, USERS[login])
        smtp.sendmail(mail_from, [to], raw)
    return mid


def refusal_code(exc: smtplib.SMTPException) -> int:
    """Postfix delays the sender check to RCPT (smtpd_delay_reject), so a refused
    sender surfaces as SMTPRecipientsRefused."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return next(iter(exc.recipients.values()))[0]
    return getattr(exc, "smtp_code", 0)


def test_user_may_send_as_itself_only() -> None:
    mid = submit(ALICE, ALICE, BOB)
    wait_for_message(BOB, mid)
    for login, sender in ((ALICE, BOB), (DELEGATE, ALICE)):
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPRecipientsRefused)) as err:
            submit(login, sender, BOB)
        assert refusal_code(err.value) == 553
        assert b"not owned by user" in str(err.value).encode()


def test_service_account_may_send_as_anyone() -> None:
    mid = submit(SVC, BOB, ALICE, port=SUBMISSIONS_PORT)
    wait_for_message(ALICE, mid)


def test_sasl_authzid_on_smtp_sends_as_the_impersonated_user() -> None:
    mid, raw = make_message(BOB, ALICE)
    with smtplib.SMTP(HOST, SUBMISSION_PORT, timeout=10) as smtp:
        smtp.starttls(context=ssl_context())
        token = base64.b64encode(f"{BOB}\0{SVC}\0{USERS[SVC]}".encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {token}")[0] == 235
        smtp.sendmail(BOB, [ALICE], raw)
        # logged in as bob now, not as svc: bob's sender policy applies
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPRecipientsRefused)) as err:
            smtp.sendmail(ALICE, [ALICE], raw)
        assert refusal_code(err.value) == 553
    wait_for_message(ALICE, mid)


def test_external_recipients_land_in_the_sink() -> None:
    mid = submit(SVC, ALICE, "friend@gmail.example")
    wait_for_message("sink@example.test", mid)


def test_deliver_lands_in_inbox() -> None:
    reset_mailbox(ALICE)
    mid = deliver(ALICE, b"Subject: from outside\r\n\r\nhi\r\n")
    conn = imap_login(ALICE)
    try:
        conn.select("INBOX", readonly=True)
        assert len(search_mid(conn, mid)) == 1
    finally:
        conn.logout()


# ---------------------------------------------------------------- Radicale

MKCALENDAR_BODY = """<?xml version="1.0" encoding="utf-8"?>
<D:mkcol xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:set><D:prop>
    <D:resourcetype><D:collection/><C:calendar/></D:resourcetype>
    <D:displayname>Alice cal</D:displayname>
  </D:prop></D:set>
</D:mkcol>"""


def test_svc_manages_alice_collections_and_bob_is_refused() -> None:
    assert DAV_PORT == 15232
    reset_dav(ALICE)
    # the principal must exist before svc can create collections in it (else 409)
    assert dav_request("MKCOL", f"/{ALICE}/")[0] == 201
    assert dav_request("MKCOL", f"/{ALICE}/calendar/", body=MKCALENDAR_BODY)[0] == 201
    status, body = dav_request("PROPFIND", f"/{ALICE}/", headers={"Depth": "1"})
    assert status == 207 and b"calendar/" in body
    assert dav_request("PROPFIND", f"/{ALICE}/", user=BOB, headers={"Depth": "1"})[0] == 403
    assert dav_request("MKCOL", f"/{ALICE}/bobs/", user=BOB)[0] == 403
    assert (
        dav_request("PROPFIND", f"/{ALICE}/calendar/", user=DELEGATE, headers={"Depth": "0"})[0]
        == 403
    )
    # alice herself sees what svc made
    assert (
        dav_request("PROPFIND", f"/{ALICE}/calendar/", user=ALICE, headers={"Depth": "0"})[0] == 207
    )
    reset_dav(ALICE)
    assert dav_request("PROPFIND", f"/{ALICE}/calendar/", headers={"Depth": "0"})[0] == 404
