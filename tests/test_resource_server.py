"""Bearer tokens at the shared gateway: introspection, dependent tokens and Groups through the real globus-sdk.

Globus answers with ``globus_sdk.testing``'s registered responses (introspection, dependent tokens, my groups),
changed field by field for each case, over ``responses``: the SDK's own HTTP, auth and parsing all run.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from globus_sdk.testing import RegisteredResponse, get_response_set, load_response

from first_jupyter.auth.resource_server import Identity, TokenIntrospector, may_use
from first_jupyter.config import ResourceServer
from first_jupyter.protocol import OpenAIError

GATEWAY = "0ca9e1b6-5ea4-4f6e-9a0b-6c1d3e4f5a6b"
POLICY = "1d2e3f40-5a6b-4c7d-8e9f-a0b1c2d3e4f5"
SCOPE = f"https://auth.globus.org/scopes/{GATEWAY}/action_all"
MY_GROUPS = get_response_set("groups.get_my_groups").metadata["group_ids"]
ADA = "c8aad43e-d274-11e5-bf98-8b02896cf782"
ADA_GMAIL = "2f3e4d5c-6b7a-4980-8a1b-2c3d4e5f6a7b"
SERVICE = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
MISSING_GROUP = "00000000-1111-4222-8333-444444444444"


def introspection(**changes: Any) -> dict[str, Any]:
    """The SDK's registered introspection answer, made current and addressed to this gateway, with ``changes``."""
    base = get_response_set("auth.oauth2_token_introspect").lookup("default")
    assert isinstance(base, RegisteredResponse)
    assert isinstance(base.json, dict)
    now = int(time.time())
    data = {**base.json, "exp": now + 3600, "iat": now, "nbf": now, "sub": ADA, "username": "ada@uni.edu",
            "aud": ["auth.globus.org", GATEWAY], "scope": f"{SCOPE} openid",
            "session_info": {"session_id": "s1", "authentications": {ADA: {"idp": "uni-idp", "auth_time": now}}},
            "identity_set_detail": [{"id": ADA, "username": "ada@uni.edu", "status": "used"},
                                    {"id": ADA_GMAIL, "username": "ada@gmail.com", "status": "used"}],
            "policy_evaluations": {POLICY: {"evaluation": True}}}
    data.update(changes)
    return data


class Globus:
    """What Globus Auth and Groups answer, set per test; every request the SDK sent is kept."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.rsps = rsps
        self.answer = introspection()
        self.forms: list[dict[str, str]] = []
        rsps.add_callback(responses.POST, "https://auth.globus.org/v2/oauth2/token/introspect",
                          callback=self._introspect)
        load_response("auth.oauth2_get_dependent_tokens", case="groups", requests_mock=rsps)
        load_response("groups.get_my_groups", requests_mock=rsps)

    def _introspect(self, request: Any) -> tuple[int, dict[str, str], str]:
        import json

        self.forms.append(dict(urllib.parse.parse_qsl(request.body)))
        return 200, {"Content-Type": "application/json"}, json.dumps(self.answer)

    def requests_to(self, path: str) -> int:
        return sum(1 for call in self.rsps.calls if urllib.parse.urlsplit(call.request.url).path == path)


@pytest.fixture
def globus() -> Iterator[Globus]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield Globus(rsps)


def introspector(clock: Any = time.time, **settings: Any) -> TokenIntrospector:
    config = ResourceServer(client_id=GATEWAY, **settings)
    return TokenIntrospector(config, "gateway-secret", want_groups=bool(settings.get("groups")), want_compute=False,
                             clock=clock)


def refusal(check: TokenIntrospector, token: str = "AT-user") -> OpenAIError:  # noqa: S107 (a fake)
    with pytest.raises(OpenAIError) as caught:
        asyncio.run(check.identify(f"Bearer {token}"))
    assert "AT-user" not in caught.value.message  # a token never shows in an answer
    return caught.value


def test_an_accepted_token_asks_with_the_gateways_client_and_includes_session_and_identities(globus):
    who = asyncio.run(introspector(policies=[POLICY]).identify("Bearer AT-user"))
    assert (who.id, who.username, who.service) == (ADA, "ada@uni.edu", False)
    form = globus.forms[0]
    assert form == {"token": "AT-user", "include": "session_info,identity_set_detail",
                    "authentication_policies": POLICY}
    auth = globus.rsps.calls[0].request.headers["Authorization"]
    assert auth.startswith("Basic ")  # the confidential client's id and secret


def test_no_bearer_token_is_a_401_that_says_what_to_send(globus):
    with pytest.raises(OpenAIError) as caught:
        asyncio.run(introspector().identify(None))
    assert caught.value.status == 401
    assert "Authorization: Bearer" in caught.value.message
    assert globus.forms == []


def test_an_inactive_token_is_401(globus):
    globus.answer = {"active": False}
    err = refusal(introspector())
    assert (err.status, err.code) == (401, "inactive_token")
    assert "not active" in err.message
    assert SCOPE in err.message
    assert err.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_expired_token_is_401_with_its_expiry(globus):
    globus.answer = introspection(exp=int(time.time()) - 60)
    err = refusal(introspector())
    assert (err.status, err.code) == (401, "expired_token")
    assert "expired at" in err.message
    assert "UTC" in err.message


def test_a_token_for_another_service_is_401(globus):
    globus.answer = introspection(aud=["auth.globus.org", "another-service"])
    err = refusal(introspector())
    assert (err.status, err.code) == (401, "wrong_audience")
    assert "another-service" in err.message
    assert GATEWAY in err.message


def test_a_token_without_the_gateways_scope_is_403(globus):
    globus.answer = introspection(scope="openid profile")
    err = refusal(introspector())
    assert (err.status, err.code) == (403, "insufficient_scope")


def test_a_session_from_a_domain_not_allowed_is_403_naming_what_signed_in(globus):
    globus.answer = introspection(session_info={"authentications": {ADA_GMAIL: {"idp": "google"}}})
    err = refusal(introspector(allowed_domains=["uni.edu", "anl.gov"]))
    assert (err.status, err.code) == (403, "identity_domain_not_allowed")
    assert "uni.edu, anl.gov" in err.message
    assert "ada@gmail.com" in err.message
    globus.answer = introspection()  # the same user signed in with the university identity: accepted
    assert asyncio.run(introspector(allowed_domains=["uni.edu"]).identify("Bearer AT-other")).username == \
        "ada@uni.edu"


def test_a_subdomain_of_an_allowed_domain_is_allowed(globus):
    globus.answer = introspection(identity_set_detail=[{"id": ADA, "username": "ada@cs.uni.edu"}])
    assert asyncio.run(introspector(allowed_domains=["uni.edu"]).identify("Bearer AT-user")).id == ADA


def test_a_failed_authentication_policy_is_403(globus):
    globus.answer = introspection(policy_evaluations={POLICY: {"evaluation": False}})
    err = refusal(introspector(policies=[POLICY]))
    assert (err.status, err.code) == (403, "policy_not_met")
    assert POLICY in err.message
    assert "sign in again" in err.message
    globus.answer = introspection(policy_evaluations={})  # not evaluated at all: not met either
    assert refusal(introspector(policies=[POLICY]), "AT-2").code == "policy_not_met"


def test_group_membership_is_read_with_a_dependent_token_and_a_missing_group_is_403(globus):
    who = asyncio.run(introspector(groups=[MY_GROUPS[1]]).identify("Bearer AT-user"))
    assert set(MY_GROUPS) <= who.groups
    dependent = next(c for c in globus.rsps.calls if c.request.url.endswith("/v2/oauth2/token"))
    assert dict(urllib.parse.parse_qsl(dependent.request.body))["grant_type"] == \
        "urn:globus:auth:grant_type:dependent_token"
    groups_call = next(c for c in globus.rsps.calls if "my_groups" in c.request.url)
    assert groups_call.request.headers["Authorization"] == "Bearer groupsToken"

    err = refusal(introspector(groups=[MISSING_GROUP]), "AT-other")
    assert (err.status, err.code) == (403, "not_in_group")
    assert f"https://app.globus.org/groups/{MISSING_GROUP}" in err.message
    assert "ada@uni.edu" in err.message


def test_a_service_identity_skips_the_session_checks(globus):
    globus.answer = introspection(sub=SERVICE, username=f"{SERVICE}@clients.auth.globus.org", session_info={},
                                  identity_set_detail=[], policy_evaluations={})
    check = introspector(allowed_domains=["uni.edu"], policies=[POLICY], groups=[MISSING_GROUP],
                         service_identities=[SERVICE])
    who = asyncio.run(check.identify("Bearer AT-service"))
    assert who.service
    assert who.id == SERVICE
    assert may_use(who, [MISSING_GROUP])  # nor do cluster and model groups apply
    assert globus.requests_to("/v2/groups/my_groups") == 0
    globus.answer = {"active": False}  # but its token must still be valid
    assert refusal(check, "AT-service-old").status == 401


def test_may_use_needs_one_of_the_groups():
    ada = Identity(ADA, "ada@uni.edu", False, time.time() + 60, frozenset({"g1"}))
    assert may_use(ada, [])
    assert may_use(ada, ["g2", "g1"])
    assert not may_use(ada, ["g2"])


def test_verdicts_are_cached_by_token_for_at_most_ten_minutes_and_never_past_expiry(globus):
    now = [time.time()]
    check = introspector(clock=lambda: now[0])
    for _ in range(3):
        asyncio.run(check.identify("Bearer AT-user"))
    assert check.introspections == 1
    now[0] += 599
    asyncio.run(check.identify("Bearer AT-user"))
    assert check.introspections == 1
    now[0] += 2  # past ten minutes
    globus.answer = introspection(exp=int(now[0]) + 30)  # this token expires in 30 s
    asyncio.run(check.identify("Bearer AT-user"))
    assert check.introspections == 2
    now[0] += 31  # past its expiry: asked again, and refused
    err = refusal(check)
    assert check.introspections == 3
    assert err.code == "expired_token"


def test_a_refused_token_is_remembered_briefly(globus):
    now = [time.time()]
    check = introspector(clock=lambda: now[0], failure_cache_s=10)
    globus.answer = {"active": False}
    refusal(check)
    refusal(check)
    assert check.introspections == 1
    now[0] += 11
    globus.answer = introspection(exp=int(now[0]) + 3600)
    assert asyncio.run(check.identify("Bearer AT-user")).id == ADA
    assert check.introspections == 2


def test_requests_arriving_together_share_one_introspection(globus):
    check = introspector()

    async def many() -> list[Identity]:
        return await asyncio.gather(*(check.identify("Bearer AT-user") for _ in range(50)))

    assert {who.id for who in asyncio.run(many())} == {ADA}
    assert check.introspections == 1
    assert len(globus.forms) == 1


def test_globus_refusing_the_gateways_own_client_is_a_503_for_the_operator(globus):
    globus.rsps.replace(responses.POST, "https://auth.globus.org/v2/oauth2/token/introspect", status=401,
                        json={"errors": [{"code": "UNAUTHORIZED"}]})
    check = introspector()
    err = refusal(check)
    assert err.status == 503
    assert "operator" in err.message
    assert err.headers["Retry-After"]
    refusal(check)
    assert check.introspections == 2  # an outage is not remembered as the token's fault
