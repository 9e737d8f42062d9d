"""Whom a request is for, at a shared gateway (``first serve``), and whose credentials its Globus Compute tasks
carry there.

The caller travels one way only: in a context variable, read with ``current()``. A cluster that calls Globus
Compute as the user (``identity: user``) must send each task with its sender's own Compute token, or every user's
work would run as whoever signed the gateway in; that token is needed several layers below the request (router,
backend, submitter, the SDK's threads), where no argument reaches. A context variable reaches them all, and is
inherited by the tasks and threads started for the request (a model start, ``asyncio.to_thread``), so the same
variable serves the layers above too (groups, quotas, accounting, whose responses), rather than a second,
explicit path that could disagree with it.

Where it is set (``acting_as``), once per unit of work, by whoever knows the caller:

- the tornado door (``api.tornado_door.answer_across``), from its ``caller()`` hook, around the whole request on
  the gateway's loop: inside the coroutine handed to that loop, since the gateway runs on a loop of its own in a
  user's Jupyter server (``transport.loop_thread``), and at ``first serve`` on tornado's (``SameLoop``);
- the batch runner (``batch.runner.BatchRun.run``), for the batch's owner, around the whole run.

What outlives the request's context captures the caller when it is made: a model start's task inherits it, and a
relayed stream (``streamed.GatewayStream``) keeps it and acts as it again for what it does from callbacks (the
response id it learns, its record when closed). Everywhere else None: a user's own Jupyter server, and the
work the gateway starts of itself (status readings, resumed batches before their run enters their owner).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar, Token
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

_ACTING: ContextVar[Caller | None] = ContextVar("first_acting_caller", default=None)
"""Read with ``current``, set with ``acting_as``: nothing else touches it."""


def current() -> Caller | None:
    """The caller whose request (or batch) the current code serves; None in a user's own Jupyter server and in
    the gateway's background work."""
    return _ACTING.get()


class acting_as:  # (lower case: used as a function, ``with acting_as(caller):``)
    """Run the block for ``caller`` (no change when None: a user's own server keeps its single user). A class
    rather than a generator: it is entered once per request."""

    __slots__ = ("_caller", "_token")

    def __init__(self, caller: Caller | None) -> None:
        self._caller = caller
        self._token: Token[Caller | None] | None = None

    def __enter__(self) -> None:
        if self._caller is not None:
            self._token = _ACTING.set(self._caller)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _ACTING.reset(self._token)
            self._token = None
