from serversync.core.tokens import add_token, find_token, make_token, strip_token


def test_token_round_trip_through_reply_prefixes() -> None:
    token = make_token("SSY", 42)
    subject = add_token("Quote for 12 chairs", token)
    assert subject == "Quote for 12 chairs [SSY:000042]"
    assert add_token(subject, token) == subject
    assert find_token(f"RE: AW: Fwd: {subject}", "SSY") == 42
    assert find_token("Quote for 12 chairs [CRM:000042]", "SSY") is None
    assert strip_token(subject, "ssy") == "Quote for 12 chairs"
    assert find_token("[SSY:1] then [SSY:000007]", "SSY") == 7
