"""Unit tests for the Exchange, Graph and Gmail connectors: documented shapes → typed errors.

The fixtures under ``tests/fixtures/ews`` and ``tests/fixtures/graph`` are written after the
Microsoft pages they name; here they go through exchangelib's own SOAP parser and through our
classifiers, so each documented failure ends as the error (and fix) an administrator reads.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from exchangelib import Account, Configuration, Credentials
from exchangelib import errors as ews_errors
from exchangelib.services import GetFolder, SyncFolderItems
from lxml import etree

from serversync.connectors import ews, gmail, graph, oauth
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import (
    AuthError,
    ConfigError,
    NotFound,
    PermanentError,
    TransientError,
)
from serversync.core.model import (
    AccessMode,
    Channel,
    CredentialSource,
    Mailbox,
    PartyKind,
    Profile,
    ServerKind,
)
from serversync.core.rules import Login, login_for
from serversync.core.secret import Secret
from tests.fakes.google_server import new_service_account_key

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SOAP = "{http://schemas.xmlsoap.org/soap/envelope/}"
IMP = Login(AccessMode.IMPERSONATION, "svc@corp.test", Secret("pw"), "bob@corp.test",
            service="svc@corp.test")
DELEG = Login(AccessMode.DELEGATION, "svc@corp.test", Secret("pw"), "bob@corp.test",
              service="svc@corp.test")


def ews_fault(name: str) -> Exception:
    root = etree.parse(str(FIXTURES / "ews" / name)).getroot()
    fault = root.find(f"{SOAP}Body/{SOAP}Fault")
    assert fault is not None
    try:
        GetFolder._raise_soap_errors(fault=fault)
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


def offline_account() -> Account:
    """An exchangelib account that never connects (fixed endpoint, version and auth type)."""
    config = Configuration(service_endpoint="https://ex.test/EWS/Exchange.asmx",
                           credentials=Credentials("svc@corp.test", "pw"), auth_type="basic",
                           version=ews.SERVER_VERSION)
    return Account("bob@corp.test", config=config, autodiscover=False,
                   access_type="impersonation")


def graph_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "graph" / name).read_text())
    assert data["source"].startswith("https://learn.microsoft.com/")
    return data


def graph_response(name: str, url: str = "https://graph.test/v1.0/users/bob@contoso.test/x",
                   ) -> httpx.Response:
    data = graph_fixture(name)
    return httpx.Response(data["status"], json=data["body"], headers=data.get("headers"),
                          request=httpx.Request("GET", url))


def test_every_fixture_names_its_source() -> None:
    for path in sorted(FIXTURES.glob("ews/*.xml")):
        assert "source: https://learn.microsoft.com/" in path.read_text(), path
    assert len(list(FIXTURES.glob("graph/*.json"))) >= 8
    for path in FIXTURES.glob("graph/*.json"):
        graph_fixture(path.name)


# ---------------------------------------------------------------- EWS


def test_server_busy_fault_becomes_transient_with_the_back_off() -> None:
    exc = ews_fault("fault-server-busy.xml")
    assert isinstance(exc, ews_errors.ErrorServerBusy) and exc.back_off == pytest.approx(297.749)
    error = ews.classify(exc, IMP, "https://ex.test/EWS/Exchange.asmx")
    assert isinstance(error, TransientError)
    assert error.code == "throttled" and error.retry_after == pytest.approx(297.749)


def test_impersonation_refused_and_missing_mailbox() -> None:
    refused = ews.classify(ews_fault("fault-impersonate-user-denied.xml"), IMP, "ex")
    assert isinstance(refused, AuthError) and refused.code == "impersonation-refused"
    assert "ApplicationImpersonation" in refused.fix and "svc@corp.test" in refused.message
    missing = ews.classify(ews_fault("fault-non-existent-mailbox.xml"), IMP, "ex")
    assert isinstance(missing, PermanentError) and missing.code == "mailbox-not-found"
    assert "bob@corp.test" in missing.message


def test_sync_folder_items_response_parses_into_changes() -> None:
    root = etree.parse(str(FIXTURES / "ews" / "syncfolderitems-response.xml")).getroot()
    body = root.find(f"{SOAP}Body")
    service = SyncFolderItems(account=offline_account())
    [message] = service._get_soap_messages(body=body)
    container = service._get_element_container(message=message,
                                               name=service.element_container_name)
    changes = [service._elem_to_obj(e) for e in container]
    assert service.sync_state == "H4sIAAAAAAAEAO29B2AcSZ=="
    assert service.includes_last_item_in_range is False
    assert [kind for kind, _ in changes] == ["create", "update", "delete", "read_flag_change"]


def test_invalid_sync_state_becomes_a_stale_cursor() -> None:
    root = etree.parse(str(FIXTURES / "ews" / "syncfolderitems-invalid-syncstate.xml")).getroot()
    service = SyncFolderItems(account=offline_account())
    [message] = service._get_soap_messages(body=root.find(f"{SOAP}Body"))
    with pytest.raises(ews_errors.ErrorInvalidSyncStateData) as caught:
        service._get_element_container(message=message, name=service.element_container_name)
    error = ews.classify(caught.value, IMP, "ex")
    assert isinstance(error, ews.StaleCursor) and isinstance(error, TransientError)


def test_delegate_access_denied_names_delegate_rights() -> None:
    error = ews.classify(ews_errors.ErrorAccessDenied("denied"), DELEG, "ex")
    assert error.code == "delegate-access-denied" and "delegate" in error.fix


def test_access_type_is_explicit() -> None:
    own = Login(AccessMode.OWN, "bob@corp.test", Secret("pw"), "bob@corp.test")
    assert ews.access_type(IMP) == "impersonation"
    assert ews.access_type(DELEG) == "delegate"
    assert ews.access_type(own) == "delegate"
    assert ews.login_name(IMP) == "svc@corp.test" and ews.login_name(own) == "bob@corp.test"


def test_plain_http_ews_url_needs_the_opt_in() -> None:
    profile = Profile("p", ServerKind.EXCHANGE, None, ews_url="http://ex.test/EWS/Exchange.asmx")
    with pytest.raises(ConfigError, match="allow_plaintext"):
        ews.check_url(profile)
    assert ews.check_url(Profile("p", ServerKind.EXCHANGE, None,
                                 ews_url="https://ex.test/EWS/Exchange.asmx")) is not None


def test_sent_request_shape_matches_the_fixture() -> None:
    root = etree.parse(str(FIXTURES / "ews" / "createitem-sendandsavecopy-request.xml")).getroot()
    op = root.find(f"{SOAP}Body/{{http://schemas.microsoft.com/exchange/services/2006/messages}}"
                   "CreateItem")
    assert op is not None and op.get("MessageDisposition") == "SendAndSaveCopy"


def test_log_redaction_masks_authorization_headers() -> None:
    import logging
    record = logging.LogRecord("exchangelib.util", logging.DEBUG, __file__, 1,
                               "Request headers: %s", ({"Authorization": "Basic c3ZjOnB3"},),
                               None)
    ews._RedactAuthorization().filter(record)
    assert "c3ZjOnB3" not in record.getMessage() and "Authorization" in record.getMessage()


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize(("name", "code"), [
    ("token-error-invalid-client-secret.json", "bad-client-secret"),
    ("token-error-secret-expired.json", "client-secret-expired"),
])
def test_token_endpoint_errors(name: str, code: str) -> None:
    data = graph_fixture(name)
    error = oauth.classify_token_error(data["status"], json.dumps(data["body"]).encode(),
                                       what="Graph token")
    assert isinstance(error, AuthError) and error.code == code
    assert "client_secret" in error.fix
    assert "Trace ID" not in error.message  # one line, no log noise


def test_google_token_errors() -> None:
    def classify(body: dict[str, str], status: int = 400) -> Any:
        return oauth.classify_token_error(status, json.dumps(body).encode(), what="Google")
    assert classify({"error": "unauthorized_client"}, 401).code == "delegation-not-granted"
    assert classify({"error": "invalid_grant",
                     "error_description": "Invalid email or User ID"}).code == "mailbox-not-found"
    assert classify({"error": "invalid_grant", "error_description": "Token has been expired "
                     "or revoked."}).code == "token-expired"
    busy = oauth.classify_token_error(503, b"", what="Google", retry_after=5)
    assert isinstance(busy, TransientError) and busy.retry_after == 5


def test_access_token_roles_come_from_the_jwt() -> None:
    data = graph_fixture("token-success.json")["body"]
    claims = oauth.jwt_claims(data["access_token"])
    token = oauth.AccessToken(Secret(data["access_token"]), 0.0, claims)
    assert token.roles == {"Mail.ReadWrite", "Mail.Send"}
    assert not token.fresh(now=0.0)
    assert data["access_token"] not in repr(token)


# ---------------------------------------------------------------- Graph


def graph_client() -> graph.GraphClient:
    profile = Profile("eo", ServerKind.EXCHANGE_ONLINE, None,
                      credential_source=CredentialSource.APP, tenant_id="t", client_id="app",
                      client_secret=Secret("s"))
    box = Mailbox("bob@contoso.test", PartyKind.USER, "bob", "eo")
    return graph.GraphClient(profile, login_for(profile, box, Channel.INCOMING), ConnectOptions())


@pytest.mark.parametrize(("name", "kind", "code"), [
    ("error-mailbox-not-enabled.json", PermanentError, "mailbox-not-enabled"),
    ("error-invalid-user.json", PermanentError, "mailbox-not-found"),
    ("error-access-denied.json", AuthError, "permission-missing"),
    ("error-token-expired.json", AuthError, "token-rejected"),
    ("error-sync-state-not-found.json", graph.StaleDelta, "cursor-invalid"),
])
def test_graph_errors(name: str, kind: type, code: str) -> None:
    error = graph_client().classify(graph_response(name), graph.ROLE_MAIL_READ)
    assert isinstance(error, kind) and error.code == code
    if code == "permission-missing":
        assert "Mail.ReadWrite" in error.fix and "RBAC for Applications" in error.fix


def test_item_not_found_is_not_a_missing_mailbox() -> None:
    response = httpx.Response(404, json={"error": {"code": "ErrorItemNotFound",
                                                   "message": "The specified object was not "
                                                              "found in the store."}},
                              request=httpx.Request("GET", "https://g.test/v1.0/users/b/x"))
    assert isinstance(graph_client().classify(response, ""), NotFound)


def test_delta_pages_from_the_fixtures() -> None:
    first = graph_fixture("message-delta-next.json")["body"]
    page = graph.DeltaPage(tuple(first["value"]), first["@odata.nextLink"], more=True)
    assert page.removed == ["AAMkADGone2"] and [i["id"] for i in page.changed] == ["AAMkADNew1"]


def test_subscription_renewal_is_due_before_expiry() -> None:
    data = graph_fixture("subscription-created.json")["body"]
    sub = graph.Subscription(data["id"], data["resource"],
                             dt.datetime.fromisoformat(data["expirationDateTime"]
                                                       .replace("Z", "+00:00")))
    assert not sub.due(sub.expires_at - dt.timedelta(hours=7))
    assert sub.due(sub.expires_at - dt.timedelta(hours=5))
    assert sub.due(sub.expires_at + dt.timedelta(seconds=1))


def test_token_url_default_and_override() -> None:
    profile = Profile("eo", ServerKind.EXCHANGE_ONLINE, None, tenant_id="contoso.onmicrosoft.com")
    assert graph.token_url(profile) == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token")
    custom = Profile("eo", ServerKind.EXCHANGE_ONLINE, None, tenant_id="t",
                     token_url="https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token")
    assert graph.token_url(custom) == "https://login.microsoftonline.us/t/oauth2/v2.0/token"


# ---------------------------------------------------------------- Gmail


def test_service_account_assertion_is_signed_for_the_user() -> None:
    pem, public = new_service_account_key()
    jwt = gmail.service_account_assertion("sa@p.iam.test", pem, "ann@ws.test",
                                          audience="https://oauth2.googleapis.com/token",
                                          now=1_700_000_000)
    head, body, signature = jwt.split(".")

    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    claims = json.loads(decode(body))
    assert claims == {"iss": "sa@p.iam.test", "sub": "ann@ws.test",
                      "scope": "https://mail.google.com/",
                      "aud": "https://oauth2.googleapis.com/token",
                      "iat": 1_700_000_000, "exp": 1_700_003_600}
    public.verify(decode(signature), f"{head}.{body}".encode(), padding.PKCS1v15(),
                  hashes.SHA256())


def test_a_bad_key_is_a_config_error_without_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        gmail.service_account_assertion("sa", "-----BEGIN PRIVATE KEY-----\nnope\n", "u",
                                        audience="a")
    assert "nope" not in str(caught.value)


def test_xoauth2_initial_response() -> None:
    assert base64.b64decode(gmail.xoauth2("ann@ws.test", "ya29.t")) == (
        b"user=ann@ws.test\x01auth=Bearer ya29.t\x01\x01")
