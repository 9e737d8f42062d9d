"""The user's Globus access tokens as ``Authorization`` lines for upstream requests.

Getting a token is blocking work (token storage, maybe a refresh at Globus Auth), so it runs in a thread, and the
line is reused for a minute: the manager never hands out a token within a minute of its expiry, so a reused line
is still valid when sent. An upstream that refuses one has it forgotten at once.
"""

from __future__ import annotations

import asyncio
import time

from first_jupyter.auth.manager import TokenManager
from first_jupyter.auth.tokens import AuthError
from first_jupyter.protocol import OpenAIError

REUSE_S = 60.0


class BearerTokens:
    def __init__(self, manager: TokenManager) -> None:
        self._manager = manager
        self._lines: dict[str, tuple[float, bytes]] = {}

    async def header(self, resource_server: str) -> bytes:
        """``Authorization: Bearer ...`` for ``resource_server``, or the 401 that says how to sign in."""
        now = time.monotonic()
        kept = self._lines.get(resource_server)
        if kept is not None and now - kept[0] < REUSE_S:
            return kept[1]
        try:
            token = await asyncio.to_thread(self._manager.token_for, resource_server)
        except AuthError as exc:
            raise OpenAIError(401, str(exc), type="authentication_error", code="globus_sign_in") from None
        line = b"Authorization: Bearer " + token.encode("latin-1") + b"\r\n"
        self._lines[resource_server] = (now, line)
        return line

    def forget(self, resource_server: str) -> None:
        """The upstream refused the token: ask the sources again next time (maybe refreshed, or signed in anew)."""
        self._lines.pop(resource_server, None)
