"""Tokens as the gateway keeps them, and reading the auth state JupyterHub's Globus authenticator hands over."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EXPIRY_MARGIN_S = 60.0
"""A token this close to its expiry is treated as expired: a request must not start with one about to lapse."""

SIGN_IN_HELP = ("Sign in with `first login` in a terminal or `%first login` in a notebook, or set "
                "$FIRST_GLOBUS_TOKEN for scripts.")


class AuthError(Exception):
    """No usable token: the message says how to get one, and never contains a token."""


@dataclass(frozen=True)
class Token:
    """One resource server's access token. ``repr`` hides the secrets: a token in a log line is a leak."""

    resource_server: str
    access_token: str = field(repr=False)
    expires_at: float | None = None
    """Seconds since the epoch; None when the source does not say (then the token is used until refused)."""
    refresh_token: str | None = field(default=None, repr=False)
    scope: str = ""

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at - EXPIRY_MARGIN_S


def tokens_from_auth_state(state: Any) -> dict[str, Token]:
    """The tokens in a GlobusOAuthenticator auth state, keyed by resource server.

    Recent authenticators keep ``{"tokens": {resource_server: {...}}, "globus_user": {...}}``, older ones the
    token dicts at the top level; a token dict has ``access_token``, maybe ``refresh_token``, and either
    ``expires_at_seconds`` (absolute) or only ``expires_in`` (relative to a login time nobody recorded).
    """
    if not isinstance(state, Mapping):
        return {}
    by_server = tokens if isinstance(tokens := state.get("tokens"), Mapping) else state
    found: dict[str, Token] = {}
    for server, data in by_server.items():
        if not isinstance(data, Mapping) or not isinstance(data.get("access_token"), str):
            continue
        expires = data.get("expires_at_seconds")
        found[str(data.get("resource_server") or server)] = Token(
            str(data.get("resource_server") or server), data["access_token"],
            float(expires) if isinstance(expires, int | float) else None,
            data.get("refresh_token") if isinstance(data.get("refresh_token"), str) else None,
            str(data.get("scope") or ""))
    return found


def user_from_auth_state(state: Any) -> dict[str, str] | None:
    """Who the hub signed in: the authenticator's ``globus_user`` (OIDC userinfo), when it kept one."""
    if not isinstance(state, Mapping):
        return None
    user = state.get("globus_user")
    if not isinstance(user, Mapping):
        return None
    return {k: str(user[k]) for k in ("sub", "preferred_username", "name", "email") if user.get(k)}


def describe_sign_in(who: dict[str, Any]) -> str:
    """``whoami`` in words: identity, source and each token's expiry; never a token."""
    if not who["signed_in"]:
        return f"Not signed in to Globus. {who['help']}"
    identity = who["identity"] or {}
    name = identity.get("preferred_username") or identity.get("sub") or "an identity this source does not name"
    lines = [f"Signed in as {name} (source: {who['source']})."]
    for server, info in who["tokens"].items():
        when = ("no stated expiry" if info["expires_at"] is None else
                time.strftime("expires %Y-%m-%d %H:%M", time.localtime(info["expires_at"])))
        state = "expired" + (", refreshable" if info["refreshable"] else "") if info["expired"] else when
        lines.append(f"  {'any resource server' if server == '*' else server}: {state}")
    return "\n".join(lines)
