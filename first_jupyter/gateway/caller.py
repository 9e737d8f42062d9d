"""Whom a request is for, at a shared gateway (``first serve``), and whose credentials its Globus Compute tasks
carry there.

A cluster that calls Globus Compute as the user (``identity: user``) must send each task with its sender's own
Compute token, or every user's work would run as whoever signed the gateway in. The token is several layers
below the request (router, backend, submitter, the SDK's threads), so the request's caller travels in a context
variable: set where the Gateway takes a request, and inherited by the tasks and threads started for it (a model
start, ``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from first_jupyter.gateway.usage import UsageRecord
    from first_jupyter.protocol import ParsedRequest


class Caller(Protocol):
    """Whom a request is for, at a shared gateway, where each request has its own sender; a user's own Jupyter
    server serves one person and passes none."""

    @property
    def user(self) -> str: ...

    async def admit(self, req: ParsedRequest) -> None:
        """Refuse before any work is done (403: the model's groups; 429: the sender's or the model's quota)."""
        ...

    async def wait_s(self, model: str) -> float:
        """For a batch's request or offloaded chunk: 0 when it may go now (counted against the sender's and the
        model's quotas), else the seconds before asking again. A batch waits its turn rather than failing, and
        holds no one else up: its requests go only as the quotas allow."""
        ...

    def may_use(self, model: str, cluster: str) -> bool:
        """Whether the sender may have ``model`` served on ``cluster`` (their groups; batches are checked here)."""
        ...

    def recorded(self, record: UsageRecord) -> None:
        """The request's accounting, once it ended (quotas, metrics and the access log follow it)."""
        ...

    def recorded_all(self, records: Sequence[UsageRecord]) -> None:
        """A batch's lines answered together by a run-batch task, each as ``recorded``, their tokens taken from
        the quotas at once: a chunk of 10,000 lines is one write to the quota store, not 10,000."""
        ...

    def token_for(self, resource_server: str) -> str | None:
        """A live access token for ``resource_server`` that the gateway holds on the sender's behalf (a Globus
        dependent token), or None."""
        ...


CALLER_TOKEN_MISSING = "compute_token_missing"  # noqa: S105 (an error code)
"""The error code of a task that must go as its caller when the gateway holds no Compute token for them (a batch
waits for its owner's next request then)."""

ACTING: ContextVar[Caller | None] = ContextVar("first_acting_caller", default=None)
"""The caller whose request (or batch) the current code serves; None in a user's own Jupyter server and in the
gateway's background work."""


@contextlib.contextmanager
def acting_as(caller: Caller | None) -> Iterator[None]:
    """Run the block for ``caller`` (no change when None: a user's own server keeps its single user)."""
    if caller is None:
        yield
        return
    token = ACTING.set(caller)
    try:
        yield
    finally:
        ACTING.reset(token)
