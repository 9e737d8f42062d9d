"""The user's Globus sign-in, as the gateway's routes offer it (who is signed in, sign in, sign out).

The token manager's work is blocking (sources read files, the hub, Globus Auth), so each call runs in a thread;
its ``AuthError`` becomes the 401 that says how to sign in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from first_jupyter.api_types import SignIn
from first_jupyter.auth.manager import TokenManager
from first_jupyter.auth.tokens import AuthError
from first_jupyter.protocol import OpenAIError


class GlobusSignIn:
    def __init__(self, auth: TokenManager) -> None:
        self.auth = auth

    async def signed_in(self) -> SignIn:
        """Who is signed in, with which source and until when; never a token."""
        return SignIn.model_validate(await asyncio.to_thread(self.auth.whoami))

    async def login_start(self) -> dict[str, str]:
        return {"url": await asyncio.to_thread(self._auth_call, self.auth.login_start)}

    async def login_finish(self, code: str) -> SignIn:
        return SignIn.model_validate(await asyncio.to_thread(self._auth_call, self.auth.login_finish, code))

    async def logout(self) -> SignIn:
        await asyncio.to_thread(self.auth.logout)
        return await self.signed_in()

    @staticmethod
    def _auth_call(call: Callable[..., Any], *args: Any) -> Any:
        """An ``AuthError`` as the 401 that says how to sign in (its message never holds a token)."""
        try:
            return call(*args)
        except AuthError as exc:
            raise OpenAIError(401, str(exc), type="authentication_error", code="globus_sign_in") from None
