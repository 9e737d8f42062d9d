"""Where a user's Globus tokens can come from; the manager tries them in the configured order.

Every source answers ``tokens()`` (by resource server; ``{}`` when it has none) and ``identity()``; those that
can renew an expired token do it in ``refresh``. Reading never raises: a broken source is logged (without its
tokens) and skipped, so the next one gets its chance.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import pickle
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from first_jupyter.auth.tokens import Token, tokens_from_auth_state, user_from_auth_state

log = logging.getLogger(__name__)
ANY_SERVER = "*"
"""The resource server of a token given without one (``$FIRST_GLOBUS_TOKEN``): used for every server."""
HUB_API_TTL_S = 60.0
HUB_API_TIMEOUT_S = 5.0


class TokenSource(Protocol):
    name: str

    def tokens(self) -> dict[str, Token]: ...

    def identity(self) -> dict[str, str] | None: ...

    def refresh(self, token: Token) -> Token | None: ...

    def renewable(self, token: Token) -> bool:
        """Whether ``refresh`` can bring this token back once it expires (what the sidebar promises)."""
        ...


class EnvSource:
    """One access token in an environment variable, for scripts and CI; it cannot be refreshed."""

    name = "env"

    def __init__(self, variable: str, environ: Mapping[str, str] = os.environ) -> None:
        self.variable = variable
        self._environ = environ

    def tokens(self) -> dict[str, Token]:
        value = self._environ.get(self.variable, "").strip()
        return {ANY_SERVER: Token(ANY_SERVER, value)} if value else {}

    def identity(self) -> dict[str, str] | None:
        return None

    def refresh(self, token: Token) -> Token | None:
        return None

    def renewable(self, token: Token) -> bool:
        return False


class _AuthStateSource:
    """A source whose tokens and identity both come from one GlobusOAuthenticator auth state (``_state``)."""

    def _state(self) -> Any:
        raise NotImplementedError

    def tokens(self) -> dict[str, Token]:
        return tokens_from_auth_state(self._state())

    def identity(self) -> dict[str, str] | None:
        return user_from_auth_state(self._state())

    def refresh(self, token: Token) -> Token | None:
        return None

    def renewable(self, token: Token) -> bool:
        """A copy of the hub's auth state cannot be refreshed here, whatever refresh token it holds: only the hub
        refreshes its users' tokens, and only the hub API shows the result."""
        return False


class HubEnvSource(_AuthStateSource):
    """``$GLOBUS_DATA``: the auth state GlobusOAuthenticator pickles into the environment at spawn.

    It is as old as the server: tokens in it may have expired, and cannot be refreshed here (the hub's client
    secret is needed); the hub API source is the fresher one. Decoded once per value of the variable.
    """

    name = "hub_env"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self._decoded: tuple[str, Any] = ("", None)

    def _state(self) -> Any:
        raw = self._environ.get("GLOBUS_DATA", "")
        if raw != self._decoded[0]:
            self._decoded = (raw, self._decode(raw))
        return self._decoded[1]

    @staticmethod
    def _decode(raw: str) -> Any:
        if not raw:
            return None
        try:
            # the hub wrote it for this server: the same trust as the environment itself
            return pickle.loads(base64.b64decode(raw))  # noqa: S301
        except (binascii.Error, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                ImportError) as exc:
            log.warning("FIRST: $GLOBUS_DATA is not an auth state this gateway can read (%s)", type(exc).__name__)
            return None


HUB_SCOPE_HELP = ("grant the scope admin:auth_state!user in the user's role and in c.Spawner.server_token_scopes "
                  "(README: behind JupyterHub)")


class HubApiSource(_AuthStateSource):
    """JupyterHub's API, which has the auth state the hub keeps refreshed, when the hub grants it to servers.

    A real hub answers ``/user`` (the token's owner) with ``auth_state: null`` whatever the scopes; only
    ``/users/{name}`` carries it, and only with ``admin:auth_state!user`` in the server's token scopes. So that
    route is asked, and a hub that withholds the state is said once in the log rather than passed over in silence
    (the tokens from ``$GLOBUS_DATA`` then expire with no way to renew them)."""

    name = "hub_api"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self._cached: tuple[float, Any] | None = None
        self._lock = threading.Lock()
        self._said_withheld = False

    def _state(self, fresh: bool = False) -> Any:
        url, token = self._environ.get("JUPYTERHUB_API_URL"), self._environ.get("JUPYTERHUB_API_TOKEN")
        user = self._environ.get("JUPYTERHUB_USER")
        if not url or not token or not user:
            return None
        with self._lock:
            if not fresh and self._cached is not None and time.monotonic() - self._cached[0] < HUB_API_TTL_S:
                return self._cached[1]
            request = urllib.request.Request(  # noqa: S310 (the hub's own URL, from the hub)
                f"{url.rstrip('/')}/users/{urllib.parse.quote(user, safe='')}",
                headers={"Authorization": f"token {token}"})
            try:
                with urllib.request.urlopen(request, timeout=HUB_API_TIMEOUT_S) as resp:  # noqa: S310 (hub URL)
                    state = json.loads(resp.read()).get("auth_state")
            except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
                log.warning("FIRST: the JupyterHub API gave no auth state (%s); %s", type(exc).__name__,
                            HUB_SCOPE_HELP)
                state = None
            else:
                if state is None and not self._said_withheld:
                    self._said_withheld = True
                    log.warning("FIRST: the JupyterHub API withholds %s's auth state, so Globus tokens cannot be "
                                "renewed and end with those the server started with; %s", user, HUB_SCOPE_HELP)
            self._cached = (time.monotonic(), state)
            return state

    def renewable(self, token: Token) -> bool:
        return True  # the hub refreshes its users' tokens (refresh_user); asking again brings the new ones

    def refresh(self, token: Token) -> Token | None:
        """The hub refreshes its users' tokens; asking again (past the cache) may bring a newer one."""
        renewed = tokens_from_auth_state(self._state(fresh=True)).get(token.resource_server)
        return renewed if renewed is not None and not renewed.expired() else None


def _stored_tokens(storage: Any) -> dict[str, Token]:
    """Tokens in a ``globus_sdk`` token storage, as ``Token``s."""
    return {server: Token(server, data.access_token, float(data.expires_at_seconds), data.refresh_token,
                          data.scope)
            for server, data in storage.get_token_data_by_resource_server().items()}


class ComputeLoginSource:
    """The token storage of an existing ``globus-compute`` login (``~/.globus_compute/storage.db``), read only:
    a user who already signed in there needs nothing more."""

    name = "compute"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ

    def _path(self) -> Path:
        base = self._environ.get("GLOBUS_COMPUTE_USER_DIR")
        return (Path(base) if base else Path.home() / ".globus_compute") / "storage.db"

    def tokens(self) -> dict[str, Token]:
        path = self._path()
        if not path.is_file():
            return {}
        from globus_sdk.token_storage import SQLiteTokenStorage

        env = self._environ.get("GLOBUS_COMPUTE_ENVIRONMENT") or self._environ.get("GLOBUS_SDK_ENVIRONMENT")
        storage = SQLiteTokenStorage(path, namespace=f"user/{env or 'production'}")
        try:
            return _stored_tokens(storage)
        except Exception as exc:  # a storage of another version or a locked file: skip, say why
            log.warning("FIRST: cannot read the globus-compute login at %s (%s)", path, type(exc).__name__)
            return {}
        finally:
            storage.close()

    def identity(self) -> dict[str, str] | None:
        return None

    def refresh(self, token: Token) -> Token | None:
        return None

    def renewable(self, token: Token) -> bool:
        return False  # read only: globus-compute itself renews what it stored, when it next runs


class NativeLoginSource:
    """``first login``: a Globus native-app login (``globus_sdk.UserApp``, refresh tokens on), its tokens in
    SQLite under the data dir, readable by the owner only. Refreshing is the app's own authorizer's job."""

    name = "native"
    APP_NAME = "first-jupyter"

    def __init__(self, client_id: str | None, scopes: Mapping[str, list[str]], data_dir: Path) -> None:
        self.client_id = client_id
        self.scopes = dict(scopes)
        self.dir = data_dir / "globus"
        self.path = self.dir / "tokens.sqlite3"
        self.identity_path = self.dir / "identity.json"

    def app(self, login_flow_manager: Any = None) -> Any:
        """The ``UserApp`` over this source's storage; ``login_flow_manager`` replaces the terminal prompt."""
        from globus_sdk import GlobusAppConfig, UserApp
        from globus_sdk.token_storage import SQLiteTokenStorage

        self.require_client_id()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = GlobusAppConfig(token_storage=SQLiteTokenStorage(self.path), request_refresh_tokens=True,
                                 **({"login_flow_manager": login_flow_manager} if login_flow_manager else {}))
        return UserApp(self.APP_NAME, client_id=self.client_id, scope_requirements=self.scopes, config=config)

    def require_client_id(self) -> None:
        from first_jupyter.auth.tokens import AuthError

        if not self.client_id:
            raise AuthError("Signing in needs a Globus native app: set auth.client_id in the FIRST config file "
                            "(register one at app.globus.org/settings/developers).")

    def tokens(self) -> dict[str, Token]:
        if not self.path.is_file():
            return {}
        from globus_sdk.token_storage import SQLiteTokenStorage

        storage = SQLiteTokenStorage(self.path)
        try:
            return _stored_tokens(storage)
        finally:
            storage.close()

    def identity(self) -> dict[str, str] | None:
        try:
            data = json.loads(self.identity_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remember_identity(self, identity: Mapping[str, str]) -> None:
        fd = os.open(self.identity_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(identity), out)

    def renewable(self, token: Token) -> bool:
        return token.refresh_token is not None

    def refresh(self, token: Token) -> Token | None:
        if token.refresh_token is None:
            return None
        app = self.app()
        try:
            app.get_authorizer(token.resource_server).get_authorization_header()  # refreshes and stores
        finally:
            app.close()
        renewed = self.tokens().get(token.resource_server)
        return renewed if renewed is not None and not renewed.expired() else None

    def forget(self) -> None:
        for path in (self.path, self.identity_path):
            path.unlink(missing_ok=True)
