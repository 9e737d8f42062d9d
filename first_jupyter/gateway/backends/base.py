"""The contract every backend speaks, so that the router never knows which kind it is talking to."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from first_jupyter.gateway.audio import FormBody
from first_jupyter.gateway.upstream import Reply
from first_jupyter.protocol import Capability, OpenAIError

if TYPE_CHECKING:
    from first_jupyter.api_types import PublishedDetails

RequestBody = bytes | FormBody
"""A request as sent to an engine: JSON bytes, or an audio form from its spool."""


def json_only(body: RequestBody, where: str, capability: Capability) -> bytes:
    """The JSON body of a backend that carries JSON only (a Globus Compute task); the 501 naming why for a form."""
    if isinstance(body, bytes):
        return body
    raise OpenAIError(501, f"{where} cannot serve {capability.route}: a Globus Compute task carries JSON requests, "
                           "not audio files. Serve the audio model from an http or local endpoint (its "
                           "capabilities: [transcriptions]), or send the request to one.", type="api_error",
                      code="unsupported_route")


class Stream(Protocol):
    """An answer's byte chunks as they come: an upstream connection, or a node's batches."""

    on_close: Callable[[], None] | None

    async def pipe(self, sink: Callable[[bytes], bool]) -> None:
        """Push each chunk into ``sink`` as it arrives; return at the end, raise ``OpenAIError`` if it breaks."""
        ...

    def resume_reading(self) -> None:
        """``sink`` returned False (the client is slow) and has drained since."""
        ...

    def close(self) -> None:
        ...

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the engine's work for this stream has ended, after ``close``: at once where
        closing ends it (an HTTP connection), once the node has stopped where it must be told (a Compute task)."""
        ...


class Backend(Protocol):
    """One endpoint of one cluster: an engine, or a gateway in front of engines."""

    cluster: str
    name: str
    kind: str
    start_s: float
    """How long a cold start of its models is expected to take, in seconds (what the router assumes until it has
    seen one); 0 where this gateway starts nothing."""
    capacity: int
    """Requests it serves at once before its answers slow down (its engine batches them)."""
    max_blocks: int
    """The blocks (engines) its endpoint may scale out to; 1 where it cannot. An endpoint's scaling adds a block
    only for requests it sees waiting, so the gateway lets one block's worth more through while it can grow."""
    keeps_responses: bool
    """Whether what it answers with keeps the Responses API's responses it creates (see
    ``launcher.engine_keeps_responses``); where not, a next turn is sent with the earlier conversation in full."""

    def upstream_name(self, model_id: str) -> str:
        """The model name the engine expects in request bodies."""
        ...

    def supports(self, model_id: str, capability: Capability) -> bool:
        """Whether this endpoint can serve ``capability`` for the model (its engine may lack a route)."""
        ...

    def model_details(self, model_id: str) -> PublishedDetails | None:
        """What the upstream says of the model beyond its id (a FIRST gateway's display name, capabilities,
        context window, token limits), for ``/v1/models``; None where it says nothing."""
        ...

    async def complete(self, model_id: str, capability: Capability, body: RequestBody) -> Reply:
        """Send one request and return the whole answer (error statuses included)."""
        ...

    async def stream(self, model_id: str, capability: Capability, body: RequestBody) -> Stream:
        """Open a stream; raise ``OpenAIError`` before the first byte if the upstream refuses."""
        ...

    async def call(self, method: str, path: str, query: str, body: bytes | None) -> Reply:
        """Send ``method`` to ``path`` under the engine's API root (``responses/{id}``: a response it keeps) with
        the query as sent, and return the whole answer (error statuses included); raise ``OpenAIError`` where this
        kind of endpoint cannot be reached that way."""
        ...

    async def status(self) -> dict[str, Any]:
        """Live state for the status API; never raises."""
        ...

    async def warm(self, model_id: str) -> None:
        """Start the model here if it is not running, and return once it answers; raise ``OpenAIError`` saying
        why when it cannot be started."""
        ...

    async def close(self) -> None:
        ...
