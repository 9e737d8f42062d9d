"""Sending a server a body too big to take, the way a client that reads early answers does: the head, then the body
in pieces, stopping at the first byte of an answer (or when the server closes), so that a test sees whether the
server refused from the head or read the body first.

A server that refuses from the head answers at once and closes; the client then stops with most of the body unsent
(the socket buffers on either side hold a few MB at most). A server that reads the body first answers only once it
has all of it.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.waiting import GUARD_S

PIECE = b"x" * (64 * 1024)
BIG = 150 * 1024 * 1024
"""What a hostile client announces: far beyond any socket buffer, and any limit the tests configure."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes
    sent: int
    """Body bytes the client had sent when the answer came (or the server closed)."""

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


def request_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(total: int) -> Iterator[bytes]:
    """``total`` body bytes in HTTP/1.1 chunked framing, a piece a chunk (the body announces no length)."""
    while total > 0:
        piece = PIECE[:total]
        total -= len(piece)
        yield b"%x\r\n%b\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def fixed(total: int) -> Iterator[bytes]:
    while total > 0:
        piece = PIECE[:total]
        total -= len(piece)
        yield piece


def connect(port: int) -> socket.socket:
    """A connection to 127.0.0.1:``port``; its timeout only guards against a server that neither reads nor
    answers."""
    return socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)


def send_until_answered(port: int, head: bytes, body: Iterable[bytes]) -> Answer:
    """Send ``head`` then ``body`` on a new connection until the server answers or closes; the answer."""
    with connect(port) as sock:
        return ask(sock, head, body)


def ask(sock: socket.socket, head: bytes, body: Iterable[bytes] = ()) -> Answer:
    """One request on ``sock``: ``head``, then ``body`` until the server answers or closes; the answer."""
    return _read_answer(sock, send_until_readable(sock, head, body))


def send_until_readable(sock: socket.socket, head: bytes, body: Iterable[bytes]) -> int:
    """Send ``head``, then ``body`` until the server answers or closes, as a client that reads early does; the body
    bytes sent."""
    sent = 0
    sock.sendall(head)
    for piece in body:
        if select.select([sock], [], [], 0)[0]:
            break  # the server has answered (or closed): a client reading early stops sending
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break  # closed while we sent: what it answered before is still to be read
        sent += len(piece)
    return sent


def _read_answer(sock: socket.socket, sent: int) -> Answer:
    """The server's answer: its head, then as many body bytes as it announced (fewer only if it closed first)."""
    received = _receive(sock, b"", lambda got: b"\r\n\r\n" in got)
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    body = _receive(sock, body, lambda got: len(got) >= length)
    return Answer(int(status_line.split(" ")[1]), headers, body, sent)


def _receive(sock: socket.socket, received: bytes, enough: Callable[[bytes], bool]) -> bytes:
    """``received`` and what follows until it is ``enough``, or the server closed (a reset after its answer, when
    it closed with the body unread, ends it too)."""
    while not enough(received):
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    return received
