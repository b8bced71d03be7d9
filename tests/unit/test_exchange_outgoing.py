"""Unit tests for the Exchange outgoing path: documented answers → send, retry, fail or alert.

The fixtures (``tests/fixtures/ews``, ``tests/fixtures/graph``, each naming its Microsoft
page) go through exchangelib's parser and our classifiers, then through the rules of
`services.outgoing_exchange`: which errors concern the channel (the runtime disables it with
an alert), which one message (it fails alone), and which prove the server did not take the
message (safe to retry; anything else during a send leaves the outcome to the Sent Items
lookup).
"""

from __future__ import annotations

import httpx
import pytest
from exchangelib import errors as ews_errors
from exchangelib.folders import SentItems
from exchangelib.restriction import Q, Restriction
from exchangelib.services import CreateItem
from lxml import etree

from serversync.connectors import ews, graph
from serversync.connectors.net import ConnectOptions
from serversync.core.errors import AuthError, PermanentError, TransientError
from serversync.core.model import Profile, ServerKind
from serversync.services.outgoing_exchange import EwsSubmitter, GraphSubmitter, channel_level
from tests.unit.test_exchange import (
    DELEG,
    FIXTURES,
    IMP,
    SOAP,
    ews_fault,
    graph_client,
    graph_response,
    offline_account,
)

M = "{http://schemas.microsoft.com/exchange/services/2006/messages}"
T = "{http://schemas.microsoft.com/exchange/services/2006/types}"


@pytest.mark.parametrize(("fixture", "code"), [
    ("createitem-error-message-size-exceeded.xml", "ErrorMessageSizeExceeded"),
    ("createitem-error-invalid-recipients.xml", "ErrorInvalidRecipients"),
])
def test_a_refused_message_fails_alone_on_ews(fixture: str, code: str) -> None:
    root = etree.parse(str(FIXTURES / "ews" / fixture))
    service = CreateItem(account=offline_account())
    try:  # exchangelib returns some response errors and raises the others
        [exc] = list(service._get_elements_in_response(
            response=service._get_soap_messages(body=root.getroot().find(f"{SOAP}Body"))))
    except ews_errors.EWSError as raised:
        exc = raised
    assert isinstance(exc, Exception)
    error = ews.classify(exc, IMP, "https://ex.test/EWS/Exchange.asmx")
    assert isinstance(error, PermanentError) and not channel_level(error)
    assert code in error.message


def test_ews_refusals_of_the_login_or_rights_are_channel_level() -> None:
    for name, login in (("fault-impersonate-user-denied.xml", IMP),
                        ("fault-non-existent-mailbox.xml", IMP)):
        error = ews.classify(ews_fault(name), login, "https://ex.test/EWS/Exchange.asmx")
        assert channel_level(error), name
    for exc, login in ((ews_errors.ErrorSendAsDenied("no"), DELEG),
                       (ews_errors.ErrorAccessDenied("no"), DELEG),
                       (ews_errors.UnauthorizedError("401"), IMP)):
        assert channel_level(ews.classify(exc, login, "https://ex.test/EWS/Exchange.asmx"))


def test_ews_server_busy_proves_the_message_was_not_taken() -> None:
    submitter = EwsSubmitter(_profile_ews(), IMP, ConnectOptions())
    busy = ews.classify(ews_fault("fault-server-busy.xml"), IMP, "https://ex.test")
    assert isinstance(busy, TransientError) and submitter.not_taken(busy)
    cut = TransientError("EWS: cannot connect", code="connection-refused")
    assert not submitter.not_taken(cut)  # may have been sent: decided by the lookup


def test_graph_answers_to_send_mail() -> None:
    client = graph_client()
    refused = client.classify(graph_response("error-invalid-recipients.json"),
                              graph.ROLE_MAIL_SEND)
    assert isinstance(refused, PermanentError) and not channel_level(refused)
    assert "ErrorInvalidRecipients" in refused.message
    denied = client.classify(graph_response("error-access-denied.json"), graph.ROLE_MAIL_SEND)
    assert isinstance(denied, AuthError) and channel_level(denied) and "Mail.Send" in denied.fix
    submitter = GraphSubmitter(client.profile, client.login, ConnectOptions())
    assert submitter.not_taken(TransientError("429", code="throttled"))
    gateway = client.classify(httpx.Response(504, request=httpx.Request("POST", "https://g.test")),
                              graph.ROLE_MAIL_SEND)
    assert isinstance(gateway, TransientError) and not submitter.not_taken(gateway)


def test_find_item_request_matches_the_fixture() -> None:
    fixture = etree.parse(str(FIXTURES / "ews" / "finditem-internetmessageid-request.xml"))
    expected = fixture.getroot().find(f"{SOAP}Body/{M}FindItem/{M}Restriction")
    assert expected is not None
    # what `EwsMailbox.sent_contains` asks exchangelib for: filter(message_id=…) on Sent Items
    restriction = Restriction(Q(message_id="<0f4c1e@corp.test>"), folders=[SentItems()],
                              applies_to=Restriction.ITEMS).to_xml(version=ews.SERVER_VERSION)
    built = etree.fromstring(etree.tostring(restriction))
    assert etree.QName(built).localname == "Restriction"
    for element in (expected, built):
        uri = element.find(f"{T}IsEqualTo/{T}FieldURI")
        constant = element.find(f"{T}IsEqualTo/{T}FieldURIOrConstant/{T}Constant")
        assert uri is not None and uri.get("FieldURI") == "message:InternetMessageId"
        assert constant is not None and constant.get("Value") == "<0f4c1e@corp.test>"


def _profile_ews() -> Profile:
    return Profile("p", ServerKind.EXCHANGE, None, ews_url="https://ex.test/EWS/Exchange.asmx")
