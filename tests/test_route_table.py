"""One route table, every door: each route declared in ``api.route_table`` is served alike by Jupyter's door
(tornado) and the gateway's own server, and nothing else is."""

from __future__ import annotations

import aiohttp
import pytest

from first_jupyter.api.route_table import ROUTES, Matcher, Route, paths
from first_jupyter.gateway.backends.compute.callbacks import CALLBACK_PATH
from first_jupyter.server_ext.handlers import jupyter_routes
from tests.conftest import Door, example_path, fake_cluster_config, server_config


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")


def test_jupyter_door_is_built_from_the_table() -> None:
    """Every path of the table, and no other, is a handler of Jupyter's door (the catch-all 404 last)."""
    built = [pattern for pattern, _, _ in jupyter_routes()]
    assert built[:-1] == [pattern + "/?" for pattern in paths()]
    assert built[-1] == "/first(?:/.*)?"
    methods = {pattern: set(kwargs["routes"]) for pattern, _, kwargs in jupyter_routes()[:-1]}
    assert methods == {pattern + "/?": {route.method for route in routes} for pattern, routes in
                       ((p, ms.values()) for p, ms in paths().items())}


def test_the_table_declares_each_method_and_path_once() -> None:
    assert len({(route.method, route.pattern) for route in ROUTES}) == len(ROUTES)
    matcher = Matcher()
    for route in ROUTES:
        found, params = matcher.match(route.method, example_path(route))
        assert found is route
        assert params == ("x",) * route.compiled.groups


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.pattern}")
async def test_every_door_serves_every_route(route: Route, door: Door) -> None:
    """Each declared method and path reaches its route on each door: whatever the answer (an empty body is
    refused, an unknown id is not found), it is never the door's 'no such route' or 'method not allowed'."""
    async with aiohttp.ClientSession() as session, session.request(
            route.method, door.at(example_path(route)), data=b"{}", headers=door.headers) as resp:
        body = await resp.json()
    code = body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
        else None
    assert code not in ("unknown_route", "method_not_allowed"), (resp.status, body)
    if route.pattern != CALLBACK_PATH:
        assert resp.status < 500, body


@pytest.mark.parametrize("path", ["/first/v1/nothing-here", "/first/v1/tokenize", "/first/api/nothing",
                                  "/first/v1/files/a/b/c", "/first"])
async def test_a_path_outside_the_table_is_404_on_every_door(path: str, door: Door) -> None:
    async with aiohttp.ClientSession() as session, session.post(door.at(path), data=b"{}",
                                                                headers=door.headers) as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body["error"]["code"] == "unknown_route"


async def test_a_method_the_path_does_not_take_is_405_naming_those_it_does(door: Door) -> None:
    async with aiohttp.ClientSession() as session, session.delete(door.route("batches"),
                                                                  headers=door.headers) as resp:
        body = await resp.json()
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, POST"
    assert body["error"]["code"] == "method_not_allowed"
