"""The authenticator of the test suite's real JupyterHub: GlobusOAuthenticator's shapes, without Globus.

Any username with the password ``pw`` logs in. What the gateway reads from a hub is what GlobusOAuthenticator
leaves there: an auth state with tokens by resource server (``build_auth_state_dict``), ``$GLOBUS_DATA`` in the
server's environment (``pre_spawn_start``), and tokens the hub renews in ``refresh_user``. So this class gives
those, and nothing more, so that the gateway's hub sources are tested against a real hub's API and scopes.

The test drives it through files in ``state_dir``, since it runs in the hub's process:
``events.log`` gets a line per login and per renewal (what a test waits on), and ``<name>.hold``, while it exists,
stands for a Globus Auth the hub cannot reach: expired tokens are then kept, not renewed.
"""

from __future__ import annotations

import base64
import pickle
import time
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from traitlets import Unicode

PASSWORD = "pw"
RESOURCE_SERVER = "funcx_service"
SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
LIFETIME_S = 172800
"""Globus access tokens last 48 hours."""


def auth_state(name: str, serial: int, expires_at: float) -> dict[str, Any]:
    """An auth state as GlobusOAuthenticator's ``build_auth_state_dict`` makes it; the access token names the
    user and how many times it was issued (``AT-ada-2``), so a test can tell a renewal from the first."""
    token = {"access_token": f"AT-{name}-{serial}", "refresh_token": f"RT-{name}", "expires_in": LIFETIME_S,
             "expires_at_seconds": int(expires_at), "resource_server": RESOURCE_SERVER, "scope": SCOPE,
             "token_type": "Bearer"}
    return {"client_id": "hub-test-client", "tokens": {RESOURCE_SERVER: token},
            "token_response": {"other_tokens": []},
            "globus_user": {"sub": f"id-{name}", "preferred_username": f"{name}@uni.edu", "name": name.title()}}


def globus_data(state: dict[str, Any]) -> str:
    """``$GLOBUS_DATA`` as GlobusOAuthenticator's ``pre_spawn_start`` writes it: the state, pickled, base64."""
    return base64.b64encode(pickle.dumps(state)).decode("ascii")


def serial_of(state: dict[str, Any]) -> int:
    return int(state["tokens"][RESOURCE_SERVER]["access_token"].rsplit("-", 1)[1])


class GlobusShapedAuthenticator(Authenticator):
    """Password ``pw`` for anyone; auth states, ``$GLOBUS_DATA`` and renewals shaped as GlobusOAuthenticator's."""

    state_dir = Unicode(config=True, help="Where the test reads events and puts hold files (see the module).")

    def _event(self, line: str) -> None:
        with (Path(self.state_dir) / "events.log").open("a") as log:
            log.write(line + "\n")

    async def authenticate(self, handler: Any, data: dict[str, str]) -> dict[str, Any] | None:
        if data.get("password") != PASSWORD:
            return None
        name = data["username"]
        self._event(f"login {name}")
        return {"name": name, "auth_state": auth_state(name, 1, time.time() + LIFETIME_S)}

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """The state into the server's environment, as GlobusOAuthenticator does (a copy of the configured
        environment: the configured dict is shared by every user's spawner)."""
        state = await user.get_auth_state()
        if state:
            spawner.environment = {**spawner.environment, "GLOBUS_DATA": globus_data(state)}

    async def refresh_user(self, user: Any, handler: Any = None) -> bool | dict[str, Any]:
        """Renew expired tokens, as an OAuthenticator does with its refresh token, unless the test holds Globus
        Auth out of reach (``<name>.hold``); valid tokens are kept."""
        state = await user.get_auth_state()
        if not state:
            return True
        token = state["tokens"][RESOURCE_SERVER]
        if token["expires_at_seconds"] > time.time() or (Path(self.state_dir) / f"{user.name}.hold").exists():
            return True
        renewed = auth_state(user.name, serial_of(state) + 1, time.time() + LIFETIME_S)
        self._event(f"renewed {user.name} {serial_of(renewed)}")
        return {"name": user.name, "auth_state": renewed}
