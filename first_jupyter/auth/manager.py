"""The server's one view of the user's Globus identity: tokens by resource server, sign-in, who is signed in.

Everything here blocks (SQLite, the hub's API, Globus Auth): the gateway calls it from a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from first_jupyter.auth.login import Handoff, HandoffLoginFlowManager
from first_jupyter.auth.sources import (
    ANY_SERVER,
    ComputeLoginSource,
    EnvSource,
    HubApiSource,
    HubEnvSource,
    NativeLoginSource,
    TokenSource,
)
from first_jupyter.auth.tokens import SIGN_IN_HELP, AuthError
from first_jupyter.config import AuthConfig

log = logging.getLogger(__name__)
URL_WAIT_S = 30.0


class _HandoffProvider:
    """What ``GlobusAppConfig.login_flow_manager`` takes to build a manager for the app's own login client."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff

    def for_globus_app(self, app_name: str, login_client: Any, config: Any) -> HandoffLoginFlowManager:
        return HandoffLoginFlowManager(login_client, request_refresh_tokens=config.request_refresh_tokens,
                                       handoff=self.handoff)


class TokenManager:
    def __init__(self, config: AuthConfig, data_dir: Path, environ: Mapping[str, str] = os.environ,
                 extra_scopes: Mapping[str, list[str]] | None = None) -> None:
        """``extra_scopes``: asked for at sign-in beside ``config.scopes`` (the endpoints' own)."""
        scopes = {server: list(wanted) for server, wanted in config.scopes.items()}
        for server, wanted in (extra_scopes or {}).items():
            scopes.setdefault(server, []).extend(s for s in wanted if s not in scopes[server])
        self.native = NativeLoginSource(config.client_id, scopes, data_dir)
        every: dict[str, TokenSource] = {"env": EnvSource(config.token_env, environ), "hub_api": HubApiSource(environ),
                                         "hub_env": HubEnvSource(environ), "native": self.native,
                                         "compute": ComputeLoginSource(environ)}
        self.sources = [every[name] for name in config.sources]
        self._login: tuple[Handoff, threading.Thread, list[BaseException]] | None = None
        self._lock = threading.Lock()

    def token_for(self, resource_server: str) -> str:
        """A valid access token for ``resource_server`` from the first source that has one (refreshed if it can
        be); ``AuthError`` saying how to sign in otherwise."""
        expired: list[str] = []
        for source in self.sources:
            tokens = source.tokens()
            token = tokens.get(resource_server) or tokens.get(ANY_SERVER)
            if token is None:
                continue
            if token.expired():
                renewed = source.refresh(token)
                if renewed is None:
                    expired.append(source.name)
                    continue
                token = renewed
            return token.access_token
        stale = f" The tokens from {', '.join(expired)} have expired and cannot be refreshed." if expired else ""
        raise AuthError(f"No Globus sign-in gives access to {resource_server}.{stale} {SIGN_IN_HELP}")

    def whoami(self) -> dict[str, Any]:
        """Which source is in use, for whom, and until when: never a token."""
        for source in self.sources:
            tokens = source.tokens()
            if tokens:
                return {"signed_in": True, "source": source.name, "identity": source.identity(),
                        "tokens": {server: {"expires_at": t.expires_at, "expired": t.expired(),
                                            "refreshable": source.renewable(t)}
                                   for server, t in sorted(tokens.items())}}
        return {"signed_in": False, "source": None, "identity": None, "tokens": {}, "help": SIGN_IN_HELP}

    # -- signing in from the server API (the sidebar, %first login) ----------------------------------------------

    def login_start(self) -> str:
        """Start a native-app login; the URL the user opens. A login already waiting for its code is replaced."""
        handoff, failures = Handoff(), []
        self.native.require_client_id()  # here, so that the caller hears it

        def run() -> None:  # the app is made where it is used: its SQLite storage belongs to one thread
            try:
                app = self.native.app(_HandoffProvider(handoff))
                try:
                    app.login(force=True)
                finally:
                    app.close()
            except BaseException as exc:  # kept for login_finish, which reports it
                failures.append(exc)
                handoff.publish_url("")  # wake login_start if it is still waiting for the URL

        thread = threading.Thread(target=run, name="first-globus-login", daemon=True)
        with self._lock:
            previous, self._login = self._login, (handoff, thread, failures)
        if previous is not None:
            previous[0].give_code("")  # the old login ends at once with "no code"
        thread.start()
        return handoff.wait_url(URL_WAIT_S)

    def login_finish(self, code: str) -> dict[str, Any]:
        """Exchange the code the user pasted, store the tokens, and say who is now signed in."""
        with self._lock:
            login, self._login = self._login, None
        if login is None:
            raise AuthError("No sign-in is waiting for a code: start one with `%first login` or `first login`.")
        handoff, thread, failures = login
        handoff.give_code(code.strip())
        thread.join(60)
        if failures:
            raise AuthError(f"Globus did not accept the code ({_reason(failures[0])}). Start the sign-in again.")
        self._remember_identity()
        return self.whoami()

    def login_in_terminal(self) -> dict[str, Any]:
        """``first login``: the SDK's own command-line flow (prints the URL, reads the code), same storage."""
        app = self.native.app()
        try:
            app.login(force=True)
        finally:
            app.close()
        self._remember_identity()
        return self.whoami()

    def _remember_identity(self) -> None:
        """Ask Globus Auth who signed in (``userinfo``), so ``whoami`` can say it without a call each time."""
        from globus_sdk import AccessTokenAuthorizer, AuthClient, GlobusAPIError

        token = self.native.tokens().get("auth.globus.org")
        if token is None:
            return
        try:
            info = AuthClient(authorizer=AccessTokenAuthorizer(token.access_token)).userinfo()
        except GlobusAPIError as exc:
            log.warning("FIRST: signed in, but Globus Auth did not say who (HTTP %s)", exc.http_status)
            return
        self.native.remember_identity({k: str(info[k]) for k in ("sub", "preferred_username", "name", "email")
                                       if info.get(k)})

    def logout(self) -> None:
        self.native.forget()


def _reason(exc: BaseException) -> str:
    """What went wrong, in words that carry no token (Globus errors name a code and a status, never a token)."""
    from globus_sdk import GlobusAPIError

    if isinstance(exc, GlobusAPIError):
        named = (exc.raw_json or {}).get("error")  # OAuth2's own error code, e.g. invalid_grant
        return f"{named if isinstance(named, str) else exc.code}, HTTP {exc.http_status}"
    return str(exc) if isinstance(exc, AuthError) else type(exc).__name__
