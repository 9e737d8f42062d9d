"""A gateway's refusal as a notebook shows it: its message, then, where the message does not already say it, the
next step in notebook terms for the statuses a cluster answers (sign in again, ask for the group, when to retry).

The gateway's messages are written for every client (curl, the openai package, scripts); a notebook user acts
through magics, so the step is named as a magic, and a wait as the time to wait, from the ``Retry-After``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from first_jupyter.protocol import duration

if TYPE_CHECKING:
    from first_jupyter.client import GatewayError

HINTS = {
    "model_not_found": "`%first models` lists what you can use.",
    "unsupported_route": "`%first models` lists what each model can do.",
    "invalid_api_key": "This kernel's FIRST_API_KEY is not the server's: restart the kernel from the Jupyter server.",
    "globus_sign_in": "Run `%first login` to sign in to Globus.",
}
"""The next step in notebook terms, for errors whose message speaks in HTTP terms."""


def _by_status(error: GatewayError, message: str) -> str | None:
    """The step a cluster's 401, 403, 429 or 503 calls for, unless ``message`` already names it."""
    wait = f"about {duration(error.retry_after)}" if error.retry_after is not None else None
    if error.status == 401 and "%first login" not in message:
        return "Sign in again: `%first login`."
    if error.status == 403 and "operators" not in message:
        return ("Your account is not in a group this cluster allows: ask its operators to add you, or use a model "
                "another cluster serves (`%first models`).")
    if error.status == 429:
        return f"The cluster is at its request limit: retry in {wait or 'a minute'}."
    if error.status == 503 and error.code != "model_starting":  # whose message says when already
        return f"Retry in {wait}; `%first status` shows where it stands." if wait else \
            "`%first status` shows where it stands; retry once it is up."
    return None


def explain(error: GatewayError) -> str:
    """One or two lines: the gateway's message, and the next step where there is one to add."""
    message = str(error).strip()
    step = HINTS.get(error.code or "") or _by_status(error, message)
    return f"{message}\n{step}" if step else message
