"""How a Globus Compute endpoint's tasks reach its nodes: the cloud service (``compute_cloud``) or the engine run
in this process (``compute_local``). Apart from the backend, so that what submits tasks beside it (the scheduler's
view of a cluster) needs no backend to name it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from first_jupyter.protocol import OpenAIError


class Submitter(Protocol):
    """How tasks reach an endpoint's nodes."""

    async def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """Send ``function(*args)`` to run on a node; the future holds its return value or its failure.
        Raises ``OpenAIError`` when the task cannot be sent (too large, not allowed)."""
        ...

    async def status(self) -> dict[str, Any]:
        """The endpoint's live state (``state``: online, offline; its workers and tasks); never raises."""
        ...

    def describe(self, exc: BaseException) -> OpenAIError:
        """A task's failure as the OpenAI error to answer, carrying the remote error's summary."""
        ...

    async def close(self) -> None:
        ...
