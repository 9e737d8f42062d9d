"""A Globus native-app login driven in two steps (get the URL; later, hand back the code) from anywhere.

``globus_sdk.UserApp`` runs a login as one blocking call that prints a URL and reads a code from the terminal.
A server API (the sidebar, ``%first login`` in a kernel) needs the URL now and the code in a later request, so
the login runs in a thread whose flow manager publishes the URL and waits for the code instead.
"""

from __future__ import annotations

import threading
from typing import Any

from globus_sdk.login_flows import CommandLineLoginFlowManager

from first_jupyter.auth.tokens import AuthError

CODE_WAIT_S = 900.0
"""How long a started login waits for its code: long enough to sign in with an identity provider and MFA."""


class Handoff:
    """The meeting point of a login thread (publishes the URL, waits for the code) and the API (the reverse)."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.code: str | None = None
        self._url_ready = threading.Event()
        self._code_ready = threading.Event()

    def publish_url(self, url: str) -> None:
        self.url = url
        self._url_ready.set()

    def wait_url(self, timeout: float) -> str:
        if not self._url_ready.wait(timeout) or not self.url:
            raise AuthError("Globus sign-in did not start (no authorization URL); try again.")
        return self.url

    def give_code(self, code: str) -> None:
        self.code = code
        self._code_ready.set()

    def wait_code(self) -> str:
        if not self._code_ready.wait(CODE_WAIT_S) or not self.code:
            raise AuthError(f"No authorization code came within {CODE_WAIT_S / 60:.0f} minutes; sign in again.")
        return self.code


class HandoffLoginFlowManager(CommandLineLoginFlowManager):
    """The command-line flow (Globus-hosted page that shows the code) with the terminal replaced by a ``Handoff``."""

    def __init__(self, *args: Any, handoff: Handoff, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handoff = handoff

    def print_authorize_url(self, authorize_url: str) -> None:
        self.handoff.publish_url(authorize_url)

    def prompt_for_code(self) -> str:
        return self.handoff.wait_code()
