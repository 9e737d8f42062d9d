"""HTTP/1.1 parsing on llhttp, both ways: what the door takes from clients and the client takes from upstreams.

Every fault found in the hand-written parsers this replaced has a regression test here, and hypothesis fuzzes
both sides: any bytes are parsed, or answered 400/431 (the door), or refused as a protocol violation (the
client), or the connection closes; no exception escapes a protocol callback, and nothing waits for a timeout.
Both sides run on the loop the gateway runs on (uvloop), whose transports log what escapes as "Fatal error".
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from first_jupyter.transport import http_server
from first_jupyter.transport.heads import MAX_HEAD_BYTES
from first_jupyter.transport.http_client import (
    MAX_INTERIM,
    Disconnected,
    HTTPClientError,
    Pool,
    ProtocolViolation,
    ResponseTooLarge,
    Url,
)
from first_jupyter.transport.http_server import BodySink, Exchange, HTTPRefusal, Request, serve
from first_jupyter.transport.loop_thread import new_event_loop
from tests.waiting import GUARD_S, eventually, eventually_async

LIMIT = 4096


class Echo:
    """An app that answers every request with what it saw of it."""

    async def __call__(self, request: Request, exchange: Exchange) -> None:
        exchange.respond(200, {"Content-Type": "application/json"},
                         json.dumps({"method": request.method, "path": request.path, "body": len(request.body),
                                     "x": request.headers.get("x")}).encode())

    def max_body(self) -> int:
        return LIMIT

    def body_sink(self, method: str, path: str, headers: dict[str, str]) -> BodySink | None:
        return None

    def refusal(self, refusal: HTTPRefusal) -> bytes:
        return json.dumps({"error": {"message": refusal.message}}).encode()


def run(main: Callable[[], Awaitable[Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``main`` on the gateway's kind of loop; also return what reached the loop's exception handler."""
    loop = new_event_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: escaped.append(context))
    try:
        return loop.run_until_complete(main()), escaped
    finally:
        loop.close()


@asynccontextmanager
async def door(max_connections: int = http_server.MAX_CONNECTIONS) -> AsyncIterator[http_server.HttpServer]:
    server = await serve(Echo(), http_server.listening_socket("127.0.0.1", 0), max_connections)
    try:
        yield server
    finally:
        server.close()


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes and read until the server closes (a failure guard of ``GUARD_S``, never reached)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), GUARD_S)
    finally:
        writer.close()


def statuses(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def door_answer(data: bytes, *, half_close: bool = True) -> tuple[bytes, list[dict[str, Any]]]:
    async def main() -> bytes:
        async with door() as server:
            return await exchange(server.port, data, half_close=half_close)
    return run(main)


GOOD = b"POST /v1/x HTTP/1.1\r\nHost: h\r\nX: 1\r\nContent-Length: 2\r\n\r\n{}"


# -- the door: regressions ---------------------------------------------------------------------------------

def test_a_good_request_is_answered():
    answer, escaped = door_answer(GOOD)
    assert statuses(answer) == [200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"method": "POST", "path": "/v1/x", "body": 2, "x": "1"}
    assert escaped == []


@pytest.mark.parametrize("length", [b"\xc2\xb2", b"+5", b"5_0", b"-5", b" 5 5", b"0x5"])
def test_a_content_length_that_is_not_ascii_digits_is_a_400(length):
    answer, escaped = door_answer(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: " + length + b"\r\n\r\n{}",
                                  half_close=False)  # the door itself must end the connection
    assert statuses(answer) == [400]
    assert b"Content-Length" in answer
    assert escaped == []


def test_content_length_with_transfer_encoding_is_answered_then_the_connection_closed():
    smuggled = (b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\nGET /v1/hidden HTTP/1.1\r\nHost: h\r\n\r\n")
    answer, escaped = door_answer(smuggled, half_close=False)  # read() returns only once the door closes
    assert statuses(answer) == [400]
    assert b"hidden" not in answer
    assert escaped == []


@pytest.mark.parametrize("line", [b"X: a\nX-Injected: yes", b"X: a\rb", b"X: a\x00b", b"X y: a", b"X\t: a",
                                  b" X: a"])
def test_header_lines_that_are_not_http_are_a_400(line):
    answer, escaped = door_answer(b"GET /v1/x HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n\r\n", half_close=False)
    assert statuses(answer) == [400]
    assert escaped == []


def test_a_huge_header_in_one_piece_is_a_431():
    answer, escaped = door_answer(b"GET /v1/x HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", half_close=False)
    assert statuses(answer) == [431]
    assert escaped == []


def endless_field(start: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """Send ``start``, then a field value a kilobyte at a time until the door closes (or four times its bound)."""
    async def main() -> bytes:
        async with door() as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(start)
            sent = 0
            while not reader.at_eof() and sent < 4 * MAX_HEAD_BYTES:  # the door closes once past its bound
                writer.write(b"a" * 1000)
                await writer.drain()
                sent += 1000
            answer = await asyncio.wait_for(reader.read(), GUARD_S)
            writer.close()
            return answer
    return run(main)


def test_a_head_that_never_ends_is_a_431_however_it_is_split():
    answer, escaped = endless_field(b"GET /v1/x HTTP/1.1\r\nX: ")
    assert statuses(answer) == [431]
    assert escaped == []


def test_pipelined_requests_are_answered_in_order_then_an_upgrade_closes():
    second = GOOD.replace(b"X: 1", b"X: 2")
    upgrade = b"GET /v1/up HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
    answer, escaped = door_answer(GOOD + second + upgrade + b"\x00\x01 whatever follows", half_close=False)
    assert statuses(answer) == [200, 200, 200]
    bodies = [json.loads(b) for b in re.findall(rb"\{[^{}]*\}", answer)]
    assert [b["x"] for b in bodies] == ["1", "2", None]
    assert bodies[2]["path"] == "/v1/up"
    assert escaped == []


def test_a_malformed_request_behind_a_good_one_is_refused_after_the_good_one_is_answered():
    answer, _ = door_answer(GOOD + b"GET /v1/x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", half_close=False)
    assert statuses(answer) == [200, 400]


def test_past_the_connection_cap_a_new_connection_gets_503_and_the_door_goes_on():
    async def main() -> tuple[list[int], list[int], list[int]]:
        async with door(max_connections=3) as server:
            port = server.port
            held = []
            for _ in range(3):  # each answered once, so the door has taken it
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(GOOD)
                await reader.readuntil(b"}")
                held.append((reader, writer))
            refused = await exchange(port, GOOD, half_close=False)
            await eventually_async(lambda: server.connections == 3, "the refused connection closed")
            _, writer = held.pop()
            writer.close()
            await eventually_async(lambda: server.connections == 2, "the door saw the close")
            again = await exchange(port, GOOD)
            still = [statuses(await exchange(port, GOOD)) for _ in range(2)]
            for _, writer in held:
                writer.close()
            return statuses(refused), statuses(again), [s[0] for s in still]
    (refused, again, still), escaped = run(main)
    assert refused == [503]
    assert again == [200]
    assert still == [200, 200]
    assert escaped == []


def test_the_cap_message_names_the_setting():
    async def main() -> bytes:
        async with door(max_connections=1) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(GOOD)
            await reader.readuntil(b"}")
            answer = await exchange(server.port, GOOD, half_close=False)
            writer.close()
            return answer
    answer, _ = run(main)
    assert b"max_client_connections" in answer


# -- the door: fuzzed --------------------------------------------------------------------------------------

HEAD_ALPHABET = st.sampled_from([b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"\x00", b"0", b"5", b"-", b"+", b"_",
                                 b"\xc2\xb2", b"a", b"Content-Length", b"Transfer-Encoding", b"chunked", b"Host",
                                 b"Expect", b"100-continue", b"Connection", b"close", b"Upgrade", b"HTTP/1.1",
                                 b"HTTP/1.0", b"POST", b"GET", b" /v1/x ", b"\r\n\r\n", b"ffffffffffffffffff",
                                 b";", b"0\r\n\r\n"])
fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mutations() -> st.SearchStrategy[bytes]:
    tokens = st.lists(HEAD_ALPHABET, max_size=40).map(b"".join)
    spliced = st.tuples(st.integers(0, len(GOOD)), tokens, st.integers(0, 20)).map(
        lambda t: GOOD[:t[0]] + t[1] + GOOD[t[0] + t[2]:])
    return st.one_of(st.binary(max_size=300), tokens, spliced, st.lists(spliced, max_size=3).map(b"".join))


@fuzz
@given(_mutations())
def test_fuzzed_requests_are_answered_or_refused_and_nothing_escapes(data):
    answer, escaped = door_answer(data)
    assert escaped == []
    for status in statuses(answer):
        assert status in (200, 400, 413, 431, 501)
    if answer:
        assert answer.startswith(b"HTTP/1.1 ")


# -- the client: regressions -------------------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def upstream(answer: bytes | Script, *, close: bool = True) -> AsyncIterator[Url]:
    """A loopback upstream that reads one request head and writes ``answer`` (then closes, unless told)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if callable(answer):
                    await answer(reader, writer)
                else:
                    writer.write(answer)
                    await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Url.parse(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x")
    finally:
        server.close()


async def fetch(url: Url, pool: Pool | None = None, limit: int | None = None) -> tuple[int, bytes]:
    own = pool is None
    pool = pool or Pool(limit=4, limit_per_host=4, connect_timeout=GUARD_S)
    try:
        resp = await pool.request("GET", url, b"", None, first_byte=GUARD_S, idle=GUARD_S)
        return resp.status, await resp.read(limit)
    finally:
        if own:
            pool.close()


def client_outcome(answer: bytes | Script, **kwargs: Any) -> tuple[Any, list[dict[str, Any]]]:
    async def main() -> Any:
        async with upstream(answer) as url:
            try:
                return await fetch(url, **kwargs)
            except HTTPClientError as exc:
                return exc
    return run(main)


@pytest.mark.parametrize("length", [b"\xc2\xb2", b"+5", b"5_0", b"-5", b"1 2"])
def test_the_client_refuses_a_content_length_that_is_not_ascii_digits(length):
    outcome, escaped = client_outcome(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhello")
    assert isinstance(outcome, ProtocolViolation), outcome
    assert "Content-Length" in str(outcome)
    assert escaped == []


def test_the_client_refuses_a_response_with_both_lengths():
    outcome, _ = client_outcome(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"5\r\nhello\r\n0\r\n\r\n")
    assert isinstance(outcome, ProtocolViolation)


def test_a_bare_lf_in_a_response_header_cannot_inject_a_header():
    outcome, _ = client_outcome(b"HTTP/1.1 200 OK\r\nX-Note: a\nX-Injected: yes\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(outcome, ProtocolViolation)


def test_endless_interim_responses_are_refused_without_recursion():
    outcome, escaped = client_outcome(b"HTTP/1.1 100 Continue\r\n\r\n" * 3000
                                      + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(outcome, ProtocolViolation)
    assert f"more than {MAX_INTERIM}" in str(outcome)
    assert escaped == []


def test_a_few_interim_responses_are_skipped():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 3
    outcome, _ = client_outcome(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert outcome == (200, b"ok")


def test_a_huge_response_head_is_refused():
    outcome, _ = client_outcome(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(outcome, ProtocolViolation)
    assert "head" in str(outcome)


def test_a_body_over_the_limit_ends_the_exchange():
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        try:
            while True:
                writer.write(b"x" * 65536)
                await writer.drain()  # ends with ConnectionError once the client has closed
        except ConnectionError:
            pass
    outcome, _ = client_outcome(endless, limit=1_000_000)
    assert isinstance(outcome, ResponseTooLarge)


def test_a_body_read_to_eof_ends_with_the_connection():
    outcome, _ = client_outcome(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert outcome == (200, b"all of it")


def test_bytes_after_a_whole_response_keep_the_connection_out_of_the_pool():
    async def main() -> tuple[list[tuple[int, bytes]], int]:
        async with upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n", close=False) as url:
            pool = Pool(limit=4, limit_per_host=4, connect_timeout=GUARD_S)
            try:
                results = []
                for _ in range(2):
                    try:
                        results.append(await fetch(url, pool))
                    except Disconnected:  # the stray bytes reached a pooled connection first: it is dropped
                        results.append(await fetch(url, pool))
                return results, pool.opened
            finally:
                pool.close()
    (results, opened), escaped = run(main)
    assert results == [(200, b"ok"), (200, b"ok")]
    assert opened == 2
    assert escaped == []


# -- the client: fuzzed ------------------------------------------------------------------------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def _response_mutations() -> st.SearchStrategy[bytes]:
    tokens = st.lists(HEAD_ALPHABET, max_size=40).map(b"".join)
    base = st.sampled_from([RESPONSE, CHUNKED, b"HTTP/1.1 100 Continue\r\n\r\n" + RESPONSE])
    spliced = st.tuples(base, st.integers(0, len(CHUNKED)), tokens, st.integers(0, 20)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + t[3]:])
    return st.one_of(st.binary(max_size=300), spliced)


@fuzz
@given(_response_mutations(), st.integers(1, 64))
def test_fuzzed_responses_are_read_or_refused_and_nothing_escapes(answer, piece):
    async def in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for start in range(0, len(answer), piece):
            writer.write(answer[start:start + piece])
            await writer.drain()

    outcome, escaped = client_outcome(in_pieces)
    assert escaped == []
    if not isinstance(outcome, HTTPClientError):
        status, body = outcome
        assert 200 <= status <= 999
        assert isinstance(body, bytes)


DOOR_UNDER_A_LOW_LIMIT = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # a node whose hard limit is low: the cap must come down
from first_jupyter.transport import http_server
from first_jupyter.transport.loop_thread import new_event_loop
from tests.test_http_parsing import Echo

async def main():
    server = await http_server.serve(Echo(), http_server.listening_socket("127.0.0.1", 0), 1024)
    print(server.port, flush=True)
    await asyncio.Event().wait()

new_event_loop().run_until_complete(main())
"""


def _status_of(sock: socket.socket) -> int:
    """Send one request on a blocking socket and read the status of its answer (the head is enough)."""
    sock.sendall(GOOD)
    head = b""
    while b"\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise AssertionError(f"closed without an answer: {head!r}")
        head += data
    return int(head.split(b" ", 2)[1])


def test_a_descriptor_limit_below_the_cap_lowers_the_cap_instead_of_starving_the_process(tmp_path):
    """1,100 idle sockets once exhausted a 1,024-descriptor limit and Jupyter stopped answering (EMFILE). Under a
    hard limit of 256, the door takes what the limit leaves room for and answers the rest 503, and serves again
    once they are gone."""
    stderr = (tmp_path / "stderr").open("w+b")
    door_process = subprocess.Popen([sys.executable, "-c", DOOR_UNDER_A_LOW_LIMIT], stdout=subprocess.PIPE,
                                    stderr=stderr, cwd=Path(__file__).parent.parent)
    held: list[socket.socket] = []
    try:
        assert door_process.stdout is not None
        port = int(door_process.stdout.readline())
        statuses_seen = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
            statuses_seen.append(_status_of(sock))
            if statuses_seen[-1] == 200:
                held.append(sock)  # idle from now on, holding its place
            else:
                sock.close()  # refused: a client goes away, and so does the connection's descriptor
        accepted = statuses_seen.count(200)
        assert 0 < accepted < 256 - 16  # room for the rest of the process was kept
        assert statuses_seen == [200] * accepted + [503] * (300 - accepted)
        for sock in held:
            sock.close()
        held.clear()

        def serves_again() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
                return _status_of(sock) == 200
        eventually(serves_again, "the door serving again once the connections closed")
    finally:
        for sock in held:
            sock.close()
        door_process.kill()
        door_process.wait()
    stderr.seek(0)
    logged = stderr.read().decode(errors="replace")
    assert "open-file limit is 256" in logged
    assert "Too many open files" not in logged


# -- found in review: trailers, storage faults, 100-continue behind another request, a paused pipe -----------

CHUNKED_REQUEST = b"POST /v1/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"


def test_trailers_are_bounded_and_never_become_headers():
    smuggled, _ = door_answer(CHUNKED_REQUEST + b"X: trailer\r\nHost: evil.example\r\n\r\n")
    assert statuses(smuggled) == [200]
    assert json.loads(smuggled.partition(b"\r\n\r\n")[2])["x"] is None  # the trailer's X is not the request's

    answer, escaped = endless_field(CHUNKED_REQUEST + b"X-T: ")
    assert statuses(answer) == [431]
    assert escaped == []


class FullDisk(Echo):
    """An app whose upload sink cannot write: the disk (or the user's quota) is full."""

    def body_sink(self, method: str, path: str, headers: dict[str, str]) -> BodySink | None:
        if path != "/v1/files":
            return None

        class Sink:
            limit = LIMIT

            def feed(self, data: bytes) -> None:
                raise OSError(28, "No space left on device")

            def discard(self) -> None:
                pass
        return Sink()


def test_a_sink_that_cannot_write_is_a_507_after_the_requests_before_it():
    async def main() -> bytes:
        server = await serve(FullDisk(), http_server.listening_socket("127.0.0.1", 0))
        try:
            upload = GOOD.replace(b"/v1/x", b"/v1/files")
            return await exchange(server.port, GOOD + upload, half_close=False)
        finally:
            server.close()
    answer, escaped = run(main)
    assert statuses(answer) == [200, 507]
    assert b"No space left on device" in answer
    assert escaped == []


def test_100_continue_waits_for_the_request_before_it_then_comes():
    expecting = b"POST /v1/x HTTP/1.1\r\nHost: h\r\nX: 2\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"

    async def main() -> bytes:
        async with door() as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(GOOD + expecting)  # both heads in one read; the second body only after 100 Continue
            seen = await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 100 Continue\r\n\r\n"), GUARD_S)
            writer.write(b"{}")
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), GUARD_S)
            writer.close()
            return seen + rest
    answer, escaped = run(main)
    assert statuses(answer) == [200, 100, 200]
    assert escaped == []


def test_http10_gets_no_100_continue():
    answer, _ = door_answer(b"POST /v1/x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}")
    assert b"100 Continue" not in answer
    assert b" 200 " in answer


def test_a_body_buffered_past_the_pause_mark_is_piped_to_its_end():
    """More than a megabyte came before anyone piped the body: reading was paused, and must resume once the sink
    takes what was buffered, or the exchange hangs (its idle timer does not run while paused)."""
    body = b"x" * (3 * 1024 * 1024)

    async def main() -> int:
        async with upstream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body) as url:
            pool = Pool(limit=4, limit_per_host=4, connect_timeout=GUARD_S)
            try:
                resp = await pool.request("GET", url, b"", None, first_byte=GUARD_S, idle=GUARD_S)
                await eventually_async(lambda: resp._conn is not None and resp._conn.paused, "reading paused")
                got: list[int] = []
                await asyncio.wait_for(resp.pipe(lambda chunk: got.append(len(chunk)) is None), GUARD_S)
                return sum(got)
            finally:
                pool.close()
    total, escaped = run(main)
    assert total == len(body)
    assert escaped == []


def test_a_url_that_is_not_ascii_becomes_one_and_holds_no_slot():
    url = Url.parse("http://bücher.example:8080/v1/modèles?q=é")
    assert url.host_header == "xn--bcher-kva.example:8080"
    assert url.target == "/v1/mod%C3%A8les?q=%C3%A9"

    async def main() -> list[int]:
        async with upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close=False) as base:
            pool = Pool(limit=1, limit_per_host=1, connect_timeout=GUARD_S)
            try:
                target = Url.parse(base.text.replace("/v1/x", "/v1/modèles"))
                return [(await fetch(target, pool))[0] for _ in range(3)]  # one slot: a leak would hang the 2nd
            finally:
                pool.close()
    statuses_seen, _ = run(main)
    assert statuses_seen == [200, 200, 200]


def test_a_closed_pool_sends_nothing_more():
    async def main() -> Exception | None:
        async with upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as url:
            pool = Pool(limit=1, limit_per_host=1, connect_timeout=GUARD_S)
            pool.close()
            try:
                await fetch(url, pool)
            except Disconnected as exc:
                return exc
            return None
    outcome, _ = run(main)
    assert isinstance(outcome, Disconnected)
    assert "shutting down" in str(outcome)
