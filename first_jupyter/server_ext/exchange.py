"""What both doors into the gateway share: the body limit, starting an inference, and relaying a stream.

The server has two doors to the same routes: Jupyter's handlers (browser cookies, Jupyter tokens, and every
route) and the keyed front (the scoped kernel key on the hot routes, without Jupyter's per-request machinery).
Each door only adapts this module to its way of writing a response, so both answer alike.
"""

from __future__ import annotations

import asyncio
from asyncio import Future
from collections.abc import Callable

from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from first_jupyter.gateway import Gateway
from first_jupyter.gateway.core import Completed, GatewayStream
from first_jupyter.gateway.router import Target
from first_jupyter.protocol import Capability, OpenAIError, parse_request

JSON = "application/json"
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Server-sent events: never cached, never held back by a buffering reverse proxy (nginx honours the last)."""


def config_error(reason: str | None) -> OpenAIError:
    """Why there is no gateway: the configuration named at start was invalid."""
    return OpenAIError(503, f"The FIRST gateway is not running because its configuration is invalid:\n{reason}\n"
                            "Fix the file and restart the Jupyter server.", type="api_error", code="config_error")


def internal_error(reason: str | None = None) -> OpenAIError:
    """A failure of the gateway itself; the traceback goes to the server log, never to the client."""
    return OpenAIError(500, reason or "The gateway failed on this request; its log has the details. Retry, and "
                                      "report it if it persists.", type="api_error")


def body_limit(max_request_bytes: int, gateway: Gateway) -> int:
    """The largest request body accepted: the extension's traitlet when set, else the config file's limit."""
    return max_request_bytes or gateway.config.defaults.limits.max_request_bytes


def too_large(size: int, limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is {size:,} bytes, over this gateway's limit of {limit:,}. Send "
                            "less (fewer or shorter messages), or raise c.FirstExtension.max_request_bytes.",
                       code="request_too_large")


def target_headers(target: Target) -> dict[str, str]:
    """Where the answer was computed, for clients that want to know (and for debugging failover)."""
    return {"X-First-Cluster": target.cluster, "X-First-Endpoint": target.endpoint}


async def start(gateway: Gateway, capability: Capability, body: bytes, limit: int) -> Completed | GatewayStream:
    """Validate a request body and run it: the whole answer, or an open stream whose status is 200."""
    if len(body) > limit:
        raise too_large(len(body), limit)
    req = parse_request(capability, body)
    return await gateway.stream(req) if req.stream else await gateway.complete(req)


async def relay(stream: GatewayStream, connection: HTTP1Connection,
                send_first: Callable[[bytes], Future[None]]) -> bool:
    """Relay ``stream`` to the client of ``connection``; True when the client left before the end.

    ``send_first`` sends the status line and headers with the first chunk, as the door's own machinery does it.
    Every later chunk is framed here and handed straight to the socket, or, when the socket refuses it, to
    tornado's stream, which also pauses the upstream until the client has drained (backpressure): tornado's
    own write path adds two futures and a loop callback per chunk, most of what relaying would cost.
    """
    started = False
    socket_stream: IOStream | None = None  # set when chunks are framed here (HTTP/1.1 chunked encoding)
    plain_socket = False

    def on_drained(drained: Future[None]) -> None:
        if not drained.cancelled():
            drained.exception()  # a closed client ends the relay through the connection's close callback
        stream.resume()

    def write(chunk: bytes) -> bool:
        nonlocal started, socket_stream, plain_socket
        if not started:
            started = True
            drained = send_first(chunk)
            if connection._chunking_output:  # else HTTP/1.0: the body is the raw bytes until the connection ends
                socket_stream = connection.stream
                plain_socket = type(socket_stream) is IOStream  # not TLS: its send has other failure modes
        elif socket_stream is None:
            drained = connection.write(chunk)
        else:
            frame = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if plain_socket and not socket_stream.writing():  # nothing queued: send now, queue the rest
                try:
                    sent = socket_stream.socket.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    raise StreamClosedError() from None
                if sent == len(frame):
                    return True
                frame = frame[sent:]
            drained = socket_stream.write(frame)
        if drained.done():
            drained.exception()  # retrieved, so a closed client logs nothing
            return True
        drained.add_done_callback(on_drained)  # the client is slow: pause the upstream until drained
        return False

    gone = False
    try:
        connection.stream.set_nodelay(True)  # each event goes out at once, not held back waiting for an ACK
        await stream.relay(write)
    except (asyncio.CancelledError, StreamClosedError):
        gone = True
    finally:
        stream.close(client_gone=gone)
    return gone
