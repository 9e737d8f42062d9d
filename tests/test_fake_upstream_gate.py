"""The fake upstream's gate, which lets a test set the pace of the work it watches instead of hoping the machine is
slow enough to catch it under way (the sidebar's batch-progress test, for one): a closed gate holds inference
requests, a release lets exactly that many through in arrival order, and the model list is never held."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp

from bench.fake_upstream import FakeUpstream
from tests.waiting import eventually_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[FakeUpstream, aiohttp.ClientSession]]:
    """A fake upstream on this test's loop, and a client session for it."""
    server = FakeUpstream(chunks=2)
    await server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            yield server, http
    finally:
        await server.stop()


async def test_a_closed_gate_holds_requests_until_each_is_released() -> None:
    async with serving() as (upstream, http):
        gate = await http.post("/gate", json={"hold": True})
        assert await gate.json() == {"held": 0, "passes": 0}

        async def chat(i: int) -> int:
            async with http.post("/v1/chat/completions", json=CHAT) as answer:
                await answer.read()
                answered.append(i)
                return answer.status

        answered: list[int] = []
        calls = []
        for i in range(5):
            calls.append(asyncio.ensure_future(chat(i)))
            # one at a time, so that the arrival order is known
            await eventually_async(lambda n=i: upstream.held == n + 1, f"request {i} held")
        models = await http.get("/v1/models")  # the gateway's status readings never wait at the gate
        assert models.status == 200
        assert answered == []

        released = await (await http.post("/gate", json={"release": 2})).json()
        assert released == {"held": 3, "passes": 0}
        await eventually_async(lambda: len(answered) == 2, "two answered")
        assert sorted(answered) == [0, 1]
        assert upstream.held == 3

        stats = await (await http.get("/stats")).json()
        assert (stats["held"], stats["active"]) == (3, 3)

        opened = await http.post("/gate", json={"open": True})
        assert await opened.json() == {"held": 0, "passes": None}
        assert await asyncio.gather(*calls) == [200] * 5
        late = await http.post("/v1/chat/completions", json=CHAT)  # an open gate holds nothing
        assert late.status == 200


async def test_passes_given_ahead_go_to_the_next_requests_and_a_client_that_leaves_takes_none() -> None:
    async with serving() as (upstream, http):
        await http.post("/gate", json={"hold": True})
        await http.post("/gate", json={"release": 1})
        first = await http.post("/v1/chat/completions", json=CHAT)  # the pass was waiting for it
        assert first.status == 200

        leaving = asyncio.ensure_future(http.post("/v1/chat/completions", json=CHAT))
        await eventually_async(lambda: upstream.held == 1, "held")
        leaving.cancel()
        await eventually_async(lambda: upstream.held == 0, "its client gone")
        await http.post("/gate", json={"release": 1})
        kept = await http.post("/v1/chat/completions", json=CHAT)  # the pass the leaver did not take
        assert kept.status == 200


async def test_a_gate_command_it_cannot_read_is_a_400_that_says_what_to_send() -> None:
    async with serving() as (_, http):
        for body in ({"release": -1}, {"release": True}, {"close": 1}, "hold"):
            answer = await http.post("/gate", json=body)
            assert answer.status == 400
            assert '{"release": N}' in (await answer.json())["error"]["message"]
        wrong = await http.get("/gate")
        assert wrong.status == 405
        assert (await http.post("/v1/chat/completions", json=CHAT)).status == 200  # still open
