"""The user's Globus tokens: every source, refresh, sign-in in two steps, and no token ever shown.

Globus Auth is reached through the real globus-sdk; only its HTTP is answered, by ``responses`` (and a real
RS512-signed ID token whose key the answered JWKS publishes, so the SDK's own ID-token check runs).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import rsa

from first_jupyter.auth.manager import TokenManager
from first_jupyter.auth.tokens import AuthError, Token
from first_jupyter.config import COMPUTE_SCOPE, AuthConfig
from tests.conftest import send_json, serving_http

CLIENT_ID = "6ffc8f4c-2b8a-4a44-9ab7-c0a7bb2b6a5d"
IDENTITY = "c8aad43e-d274-11e5-bf98-8b02896cf782"
AUTH = "https://auth.globus.org"
JSON = {"Content-Type": "application/json"}
SECRETS = ("AT-compute-1", "AT-compute-2", "AT-auth-1", "RT-compute-1", "RT-auth-1", "AT-hub", "AT-env", "RT-hub")


def _authenticator_state(access_token: str, **token_fields: Any) -> dict[str, Any]:
    """An auth state as GlobusOAuthenticator's ``build_auth_state_dict`` makes it."""
    tokens = {"funcx_service": {"access_token": access_token, "refresh_token": "RT-hub", "expires_in": 172800,
                                "resource_server": "funcx_service", "scope": COMPUTE_SCOPE, "token_type": "Bearer",
                                **token_fields}}
    return {"client_id": "hub-client", "tokens": tokens, "token_response": {"other_tokens": []},
            "globus_user": {"sub": IDENTITY, "preferred_username": "ada@uni.edu", "name": "Ada Lovelace"}}


def _globus_data(state: dict[str, Any]) -> str:
    """``$GLOBUS_DATA`` as the authenticator's ``pre_spawn_start`` sets it."""
    return base64.b64encode(pickle.dumps(state)).decode("utf-8")


def _manager(tmp_path: Path, *sources: str, environ: dict[str, str] | None = None, **auth: Any) -> TokenManager:
    config = AuthConfig(sources=list(sources), client_id=CLIENT_ID, **auth)
    return TokenManager(config, tmp_path / "data", environ if environ is not None else {})


def test_globus_data_from_the_hub_is_read(tmp_path):
    manager = _manager(tmp_path, "hub_env", environ={"GLOBUS_DATA": _globus_data(_authenticator_state("AT-hub"))})
    assert manager.token_for("funcx_service") == "AT-hub"
    who = manager.whoami()
    assert (who["source"], who["identity"]["preferred_username"]) == ("hub_env", "ada@uni.edu")
    # a copy of the hub's state: its refresh token is the hub's to use, so nothing here can renew it
    assert who["tokens"]["funcx_service"] == {"expires_at": None, "expired": False, "refreshable": False}


def test_an_expired_hub_token_says_how_to_sign_in(tmp_path):
    state = _authenticator_state("AT-hub", expires_at_seconds=time.time() - 10)
    manager = _manager(tmp_path, "hub_env", environ={"GLOBUS_DATA": _globus_data(state)})
    with pytest.raises(AuthError, match="from hub_env have expired") as info:
        manager.token_for("funcx_service")
    assert "`%first login`" in str(info.value)
    assert "AT-hub" not in str(info.value)


def test_unreadable_globus_data_is_skipped_for_the_next_source(tmp_path, caplog):
    manager = _manager(tmp_path, "hub_env", "env",
                       environ={"GLOBUS_DATA": "not base64 pickle", "FIRST_GLOBUS_TOKEN": "AT-env"})
    assert manager.token_for("funcx_service") == "AT-env"
    assert "$GLOBUS_DATA is not an auth state" in caplog.text


class _Hub(BaseHTTPRequestHandler):
    """The hub's API as JupyterHub 6 answers a server's own API token: ``/user`` never carries the auth state
    (``auth_state: null``); ``/users/{name}`` does, when the token holds ``admin:auth_state!user`` (``granted``)."""

    state: ClassVar[dict[str, Any]] = {}
    calls: ClassVar[list[str]] = []
    granted: ClassVar[bool] = True

    def do_GET(self) -> None:
        type(self).calls.append(self.headers.get("Authorization", ""))
        ok = self.headers.get("Authorization") == "token hub-api-token"
        if ok and self.path == "/hub/api/user":
            send_json(self, {"name": "ada", "auth_state": None})
        elif ok and self.path == "/hub/api/users/ada":
            send_json(self, {"name": "ada", "auth_state": self.state if self.granted else None})
        else:
            send_json(self, {"message": "no"}, 403 if not ok else 404)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    _Hub.state, _Hub.calls, _Hub.granted = _authenticator_state("AT-hub-api"), [], True
    with serving_http(_Hub) as url:
        yield f"{url}/hub/api"


HUB_SERVER_ENV = {"JUPYTERHUB_API_TOKEN": "hub-api-token", "JUPYTERHUB_USER": "ada"}
"""What a hub puts in its single-user server's environment, besides the API URL."""


def test_the_hub_api_is_fresher_than_globus_data_and_is_asked_once_a_minute(tmp_path, hub):
    environ = {"JUPYTERHUB_API_URL": hub, **HUB_SERVER_ENV, "GLOBUS_DATA": _globus_data(_authenticator_state("AT-hub"))}
    manager = _manager(tmp_path, "hub_api", "hub_env", environ=environ)
    assert manager.token_for("funcx_service") == "AT-hub-api"
    assert manager.token_for("funcx_service") == "AT-hub-api"
    assert _Hub.calls == ["token hub-api-token"]
    who = manager.whoami()
    assert who["source"] == "hub_api"
    assert who["tokens"]["funcx_service"]["refreshable"] is True  # the hub renews them


def test_without_the_hubs_grant_globus_data_is_used_and_the_log_says_which_scope(tmp_path, hub, caplog):
    _Hub.granted = False
    environ = {"JUPYTERHUB_API_URL": hub, **HUB_SERVER_ENV, "GLOBUS_DATA": _globus_data(_authenticator_state("AT-hub"))}
    manager = _manager(tmp_path, "hub_api", "hub_env", environ=environ)
    assert manager.token_for("funcx_service") == "AT-hub"
    assert manager.whoami()["source"] == "hub_env"
    withheld = [r.getMessage() for r in caplog.records if "withholds" in r.getMessage()]
    assert len(withheld) == 1
    assert "admin:auth_state!user" in withheld[0]
    assert "server_token_scopes" in withheld[0]


def test_a_token_the_hub_does_not_know_falls_back_to_globus_data(tmp_path, hub):
    environ = {"JUPYTERHUB_API_URL": hub, **HUB_SERVER_ENV, "JUPYTERHUB_API_TOKEN": "wrong",
               "GLOBUS_DATA": _globus_data(_authenticator_state("AT-hub"))}
    assert _manager(tmp_path, "hub_api", "hub_env", environ=environ).token_for("funcx_service") == "AT-hub"


def test_an_environment_token_serves_every_resource_server(tmp_path):
    manager = _manager(tmp_path, "env", "native", environ={"FIRST_GLOBUS_TOKEN": "AT-env"})
    assert manager.token_for("funcx_service") == manager.token_for("some-gateway") == "AT-env"


def test_no_sign_in_anywhere_is_one_clear_error(tmp_path):
    with pytest.raises(AuthError, match="No Globus sign-in gives access to funcx_service") as info:
        _manager(tmp_path, "env", "hub_env", "hub_api", "native", "compute",
                 environ={"GLOBUS_COMPUTE_USER_DIR": str(tmp_path / "nothing")}).token_for("funcx_service")
    assert "`first login`" in str(info.value)
    assert not _manager(tmp_path, "native").whoami()["signed_in"]


def test_tokens_do_not_show_in_their_repr():
    text = repr(Token("funcx_service", "AT-compute-1", None, "RT-compute-1"))
    assert "AT-compute-1" not in text
    assert "RT-compute-1" not in text


# -- native-app sign-in through the real globus-sdk ----------------------------------------------------------------


class GlobusAuth:
    """Globus Auth's token, OIDC and userinfo endpoints, answered over HTTP for the real SDK."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.grants: list[dict[str, str]] = []
        self.access_expires_in = 172800
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        rsps.add(responses.GET, f"{AUTH}/.well-known/openid-configuration",
                 json={"issuer": AUTH, "jwks_uri": f"{AUTH}/jwk.json",
                       "id_token_signing_alg_values_supported": ["RS512"]})
        rsps.add(responses.GET, f"{AUTH}/jwk.json", json={"keys": [{**jwk, "alg": "RS512", "use": "sig"}]})
        rsps.add_callback(responses.POST, f"{AUTH}/v2/oauth2/token", callback=self._token)
        rsps.add(responses.GET, f"{AUTH}/v2/oauth2/userinfo",
                 json={"sub": IDENTITY, "preferred_username": "ada@uni.edu", "name": "Ada Lovelace",
                       "email": "ada@uni.edu"})

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        form = dict(urllib.parse.parse_qsl(request.body))
        self.grants.append(form)
        if form["grant_type"] == "authorization_code":
            if form["code"] != "good-code":
                return 401, JSON, json.dumps({"error": "invalid_grant"})
            compute = {"access_token": "AT-compute-1", "refresh_token": "RT-compute-1", "scope": COMPUTE_SCOPE,
                       "expires_in": self.access_expires_in, "token_type": "Bearer",
                       "resource_server": "funcx_service"}
            now = int(time.time())
            id_token = jwt.encode({"sub": IDENTITY, "aud": CLIENT_ID, "iss": AUTH, "iat": now, "exp": now + 3600},
                                  self.key, algorithm="RS512")
            return 200, JSON, json.dumps({"access_token": "AT-auth-1", "refresh_token": "RT-auth-1",
                                        "scope": "openid profile email", "expires_in": 172800,
                                        "token_type": "Bearer", "resource_server": "auth.globus.org",
                                        "id_token": id_token, "state": "_default", "other_tokens": [compute]})
        assert form == {"grant_type": "refresh_token", "refresh_token": "RT-compute-1", "client_id": CLIENT_ID}
        return 200, JSON, json.dumps({"access_token": "AT-compute-2", "refresh_token": "RT-compute-1",
                                    "scope": COMPUTE_SCOPE, "expires_in": 172800, "token_type": "Bearer",
                                    "resource_server": "funcx_service", "other_tokens": []})


@pytest.fixture
def globus_auth() -> Iterator[GlobusAuth]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield GlobusAuth(rsps)


def test_sign_in_in_two_steps_stores_tokens_for_the_owner_only(tmp_path, globus_auth, caplog):
    manager = _manager(tmp_path, "native")
    url = urllib.parse.urlsplit(manager.login_start())
    query = dict(urllib.parse.parse_qsl(url.query))
    assert (url.netloc, url.path, query["client_id"]) == ("auth.globus.org", "/v2/oauth2/authorize", CLIENT_ID)
    assert COMPUTE_SCOPE in query["scope"]
    assert query["access_type"] == "offline"  # refresh tokens on
    who = manager.login_finish("good-code")
    assert (who["source"], who["identity"]["preferred_username"]) == ("native", "ada@uni.edu")
    assert manager.token_for("funcx_service") == "AT-compute-1"
    store = tmp_path / "data" / "globus"
    assert os.stat(store).st_mode & 0o777 == 0o700
    assert all(os.stat(f).st_mode & 0o077 == 0 for f in store.iterdir())
    shown = json.dumps(who) + caplog.text
    assert not [secret for secret in SECRETS if secret in shown]


def test_a_wrong_code_is_refused_without_echoing_anything_secret(tmp_path, globus_auth):
    manager = _manager(tmp_path, "native")
    manager.login_start()
    with pytest.raises(AuthError, match=r"did not accept the code \(invalid_grant, HTTP 401\)"):
        manager.login_finish("bad-code")
    with pytest.raises(AuthError, match="No sign-in is waiting"):
        manager.login_finish("good-code")


def test_an_expired_token_is_refreshed_with_the_refresh_token(tmp_path, globus_auth):
    globus_auth.access_expires_in = 5  # inside the expiry margin: expired as soon as stored
    manager = _manager(tmp_path, "native")
    manager.login_start()
    manager.login_finish("good-code")
    assert manager.token_for("funcx_service") == "AT-compute-2"
    assert globus_auth.grants[-1]["grant_type"] == "refresh_token"


def test_signing_in_needs_a_client_id(tmp_path):
    with pytest.raises(AuthError, match=r"set auth\.client_id"):
        TokenManager(AuthConfig(sources=["native"]), tmp_path, {}).login_start()
