"""A minimal AMQP 0-9-1 broker on loopback, for tests of code that takes results over AMQP with pika.

globus-compute-sdk's ``Executor`` submits tasks over HTTPS (mocked with ``responses``) but receives their results
from a RabbitMQ queue: its ``_ResultWatcher`` thread opens a ``pika.SelectConnection``, opens one channel and
``basic_consume``s from ``f"{queue_prefix}{task_group_id}"``, acks with ``multiple=True`` and nacks what it cannot
unpack. This stub speaks just enough of the protocol for that client (and for pika's ``BlockingConnection``): the
connection handshake, channels, queue declare, qos, consume/cancel, deliveries, acks/nacks and both directions
of close. Frames are parsed and built with pika's own ``pika.frame``/``pika.spec`` classes, so what goes over the
wire is what pika itself would accept from a real broker.

Deliberate simplifications: there are no exchanges or routing (``deliver()`` puts a message straight on a named
queue; client ``basic_publish`` is not supported), every queue exists as soon as anyone names it (a passive
declare never fails), and a nacked or rejected message is recorded in ``nacked`` and dropped, not requeued (the
SDK nacks with ``requeue=True`` messages it can never unpack; redelivering them would loop forever). Messages
delivered but not yet acked go back to the front of their queue when their channel or connection closes, as on
RabbitMQ. Heartbeats are off unless the client asks; a heartbeat frame is answered with one.

Everything runs on one background thread around a ``selectors`` loop; ``deliver()`` and ``stop()`` may be
called from any thread (they take a lock and wake the loop through a socket pair).
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import pika.amqp_object
import pika.exceptions
import pika.frame
import pika.spec as spec

_FRAME_MAX = 131072
"""The largest frame offered in ``Connection.Tune``; bodies are split to fit what the client settles on."""
_FRAME_OVERHEAD = 8
"""Bytes of a frame that are not payload: type, channel, size, frame-end."""


@dataclass
class Message:
    """One message on a queue: what ``deliver()`` was given."""

    queue: str
    body: bytes
    properties: spec.BasicProperties
    redelivered: bool = False


@dataclass
class _Client:
    """One client connection: its socket, unparsed input, unsent output and per-channel state."""

    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    frame_max: int = _FRAME_MAX
    channels: set[int] = field(default_factory=set)
    consumers: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Consumer tag -> (channel number, queue name)."""
    unacked: dict[int, dict[int, Message]] = field(default_factory=dict)
    """Channel number -> delivery tag -> message delivered on it and not yet settled."""
    next_tag: dict[int, int] = field(default_factory=dict)
    closing: bool = False
    """Close the socket once ``outbuf`` is sent (after CloseOk, or a server-side Close on stop)."""


class FakeAmqpBroker:
    """An AMQP 0-9-1 broker stub listening on ``host`` at an ephemeral ``port``.

    Use as a context manager (``with FakeAmqpBroker() as broker:``) or call ``start()`` and ``stop()``. Publish
    with ``deliver(queue, body, properties)``: the message goes to a consumer of that queue, or waits on the
    queue until one appears. ``acked`` and ``nacked`` list the messages clients settled, for assertions.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._clients: dict[socket.socket, _Client] = {}
        self._queues: dict[str, deque[Message]] = {}
        self._ctags = itertools.count(1)
        self._cond = threading.Condition(threading.RLock())
        """Guards all broker state; reentrant so the count methods also work inside ``wait_until`` predicates."""
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"FakeAmqpBroker:{self.port}", daemon=True)
        self.acked: list[Message] = []
        self.nacked: list[Message] = []

    @property
    def url(self) -> str:
        """The ``amqp://`` URL pika connects to (default vhost ``/``, any credentials are accepted)."""
        return f"amqp://{self.host}:{self.port}/"

    def start(self) -> FakeAmqpBroker:
        self._thread.start()
        return self

    def __enter__(self) -> FakeAmqpBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def deliver(self, queue: str, body: bytes, properties: spec.BasicProperties | None = None) -> None:
        """Put a message on ``queue``, as the service would; a consumer gets it at once or when it subscribes."""
        with self._cond:
            self._queues.setdefault(queue, deque()).append(
                Message(queue, body, properties if properties is not None else spec.BasicProperties()))
        self._wake()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def connection_count(self) -> int:
        """Open client connections (for ``wait_until``: a client that closed cleanly is gone at once)."""
        with self._cond:
            return len(self._clients)

    def consumer_count(self, queue: str) -> int:
        with self._cond:
            return self._consumers_of(queue)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Block until ``predicate()`` (evaluated under the broker's lock after each event) holds.

        Raises ``TimeoutError`` after ``timeout`` seconds, so a test fails instead of hanging; the default is only a
        guard, generous enough for a loaded machine. Predicates read ``acked``, ``nacked``, ``connection_count()``
        or ``consumer_count()``.
        """
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"broker state did not reach {predicate!r} within {timeout}s")

    def stop(self, timeout: float = 30.0) -> None:
        """Close the listening socket and every connection (sending each a ``Connection.Close``), join the thread.

        Safe to call more than once and without ``start()``.
        """
        self._stopping = True
        if self._thread.is_alive():
            self._wake()
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("FakeAmqpBroker thread did not stop")
        else:
            self._close_everything()

    # --- the loop thread -------------------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the loop has already closed it: nothing left to wake
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            while not self._stopping:
                events = self._selector.select()
                with self._cond:
                    for key, mask in events:
                        if key.fileobj is self._listener:
                            self._accept()
                        elif key.fileobj is self._wake_r:
                            with contextlib.suppress(BlockingIOError):
                                self._wake_r.recv(4096)
                        else:
                            client = self._clients.get(key.fileobj)
                            if client is not None and mask & selectors.EVENT_WRITE:
                                self._flush(client)
                            if client is not None and client.sock in self._clients and mask & selectors.EVENT_READ:
                                self._receive(client)
                    self._dispatch()
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._close_everything()
                self._cond.notify_all()

    def _close_everything(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            client.outbuf.clear()
            self._send_method(client, 0, spec.Connection.Close(320, "CONNECTION_FORCED - broker stopped", 0, 0))
            self._drop(client)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._clients[sock] = _Client(sock)
        self._selector.register(sock, selectors.EVENT_READ)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        while client.sock in self._clients:
            try:
                used, frame = pika.frame.decode_frame(bytes(client.inbuf))
            except pika.exceptions.InvalidFrameError:
                self._drop(client)
                return
            if frame is None:
                return
            del client.inbuf[:used]
            if isinstance(frame, pika.frame.ProtocolHeader):
                self._send_method(client, 0, spec.Connection.Start(
                    server_properties={"product": "FakeAmqpBroker", "capabilities": {"basic.nack": True}}))
            elif isinstance(frame, pika.frame.Method):
                self._on_method(client, frame.channel_number, frame.method)
            elif isinstance(frame, pika.frame.Heartbeat):
                self._send(client, pika.frame.Heartbeat())
            # content frames would follow a client Basic.Publish, which is not supported: ignored

    def _on_method(self, client: _Client, ch: int, method: pika.amqp_object.Method) -> None:
        """Answer one client method, as a broker would for this subset of AMQP 0-9-1."""
        match method:
            case spec.Connection.StartOk():
                self._send_method(client, 0, spec.Connection.Tune(channel_max=2047, frame_max=_FRAME_MAX,
                                                                  heartbeat=0))
            case spec.Connection.TuneOk():
                client.frame_max = method.frame_max or _FRAME_MAX
            case spec.Connection.Open():
                self._send_method(client, 0, spec.Connection.OpenOk())
            case spec.Connection.Close():
                self._send_method(client, 0, spec.Connection.CloseOk())
                client.closing = True
                self._flush(client)
            case spec.Connection.CloseOk():
                self._drop(client)
            case spec.Channel.Open():
                client.channels.add(ch)
                self._send_method(client, ch, spec.Channel.OpenOk())
            case spec.Channel.Close():
                self._close_channel(client, ch)
                self._send_method(client, ch, spec.Channel.CloseOk())
            case spec.Channel.CloseOk():
                pass
            case spec.Queue.Declare():
                name = method.queue or f"amq.gen-{next(self._ctags)}"
                messages = self._queues.setdefault(name, deque())
                if not method.nowait:
                    self._send_method(client, ch, spec.Queue.DeclareOk(name, len(messages), self._consumers_of(name)))
            case spec.Basic.Qos():
                self._send_method(client, ch, spec.Basic.QosOk())
            case spec.Basic.Consume():
                tag = method.consumer_tag or f"amq.ctag-{next(self._ctags)}"
                client.consumers[tag] = (ch, method.queue)
                self._queues.setdefault(method.queue, deque())
                if not method.nowait:
                    self._send_method(client, ch, spec.Basic.ConsumeOk(tag))
            case spec.Basic.Cancel():
                client.consumers.pop(method.consumer_tag, None)
                if not method.nowait:
                    self._send_method(client, ch, spec.Basic.CancelOk(method.consumer_tag))
            case spec.Basic.Ack():
                self.acked += self._settle(client, ch, method.delivery_tag, method.multiple)
            case spec.Basic.Nack():
                self.nacked += self._settle(client, ch, method.delivery_tag, method.multiple)
            case spec.Basic.Reject():
                self.nacked += self._settle(client, ch, method.delivery_tag, multiple=False)
            case _:
                self._send_method(client, 0, spec.Connection.Close(540, f"NOT_IMPLEMENTED - {method.NAME}",
                                                                   method.INDEX >> 16, method.INDEX & 0xFFFF))

    def _consumers_of(self, queue: str) -> int:
        return sum(q == queue for c in self._clients.values() for _, q in c.consumers.values())

    def _settle(self, client: _Client, ch: int, delivery_tag: int, multiple: bool) -> list[Message]:
        """Forget the deliveries an ack/nack covers (``multiple``: every tag up to this one; tag 0: all)."""
        pending = client.unacked.get(ch, {})
        tags = [t for t in pending if t <= delivery_tag or delivery_tag == 0] if multiple else [delivery_tag]
        return [pending.pop(t) for t in tags if t in pending]

    def _close_channel(self, client: _Client, ch: int) -> None:
        """Drop the channel's consumers and put its unsettled messages back at the front of their queues."""
        client.channels.discard(ch)
        client.consumers = {tag: (c, q) for tag, (c, q) in client.consumers.items() if c != ch}
        for message in reversed(client.unacked.pop(ch, {}).values()):
            message.redelivered = True
            self._queues.setdefault(message.queue, deque()).appendleft(message)

    def _drop(self, client: _Client) -> None:
        for ch in list(client.unacked) + list(client.channels):
            self._close_channel(client, ch)
        if self._clients.pop(client.sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
            with contextlib.suppress(OSError):
                client.sock.send(client.outbuf)  # best effort: a final Close the client may still read
            client.sock.close()

    def _dispatch(self) -> None:
        """Hand each waiting message to a consumer of its queue (the first one found; no round-robin)."""
        for name, messages in list(self._queues.items()):
            while messages:
                found = next(((c, ch, tag) for c in self._clients.values() if not c.closing
                              for tag, (ch, q) in c.consumers.items() if q == name), None)
                if found is None:
                    break
                client, ch, tag = found
                message = messages.popleft()
                delivery_tag = client.next_tag.get(ch, 0) + 1
                client.next_tag[ch] = delivery_tag
                client.unacked.setdefault(ch, {})[delivery_tag] = message
                chunk = client.frame_max - _FRAME_OVERHEAD
                body = [pika.frame.Body(ch, message.body[i:i + chunk]) for i in range(0, len(message.body), chunk)]
                self._send(client,
                           pika.frame.Method(ch, spec.Basic.Deliver(tag, delivery_tag, message.redelivered, "", name)),
                           pika.frame.Header(ch, len(message.body), message.properties), *body)

    def _send_method(self, client: _Client, ch: int, method: pika.amqp_object.Method) -> None:
        self._send(client, pika.frame.Method(ch, method))

    def _send(self, client: _Client, *frames: pika.frame.Frame) -> None:
        client.outbuf += b"".join(frame.marshal() for frame in frames)
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes now; watch for writability while anything is left."""
        if client.sock not in self._clients:
            return
        try:
            sent = client.sock.send(client.outbuf) if client.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        del client.outbuf[:sent]
        if client.closing and not client.outbuf:
            self._drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        self._selector.modify(client.sock, events)
