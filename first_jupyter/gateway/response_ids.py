"""Where each response was created, so that what follows it reaches the engine that holds it.

An engine keeps the responses it creates (vLLM and OpenAI's API with ``store``): retrieving one, deleting it,
cancelling a background one, listing its input items, and a next turn that names it as ``previous_response_id``
must all go to that same engine, since no other has heard of it. So the gateway remembers, for each response id
it relayed, the cluster and endpoint that answered, the public model name (answers are renamed back to it), and
who asked (at a shared gateway each caller reaches only their own responses).

Engines need not keep what they create: ``transformers serve`` keeps nothing, and vLLM keeps responses only when
told to (``VLLM_ENABLE_RESPONSES_API_STORE``). So the gateway keeps its own copy of each response it relays whole
(the answer, or a stream's last event) with the request's input, unless the request said ``store: false``; a call
the engine cannot answer (404 for an id it does not keep, or an endpoint that cannot be asked again) is answered
from that copy (``answer_from_copy``).

Bounded (``defaults.max_response_ids``): beyond it the oldest are forgotten, in memory and on disk. Kept in
SQLite under the data dir like usage, written off the request path (``QueuedWriter``), so that ids outlive a
restart and a shared gateway's processes find each other's: an id this process does not hold in memory is read
from the file (another process's becomes readable within the writer's short batch interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from first_jupyter.gateway.caller import current
from first_jupyter.gateway.queued_writer import QueuedWriter, json_available
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.protocol import OpenAIError, json_kind, list_page, page_limit, shown
from first_jupyter.sqlite_wal import use_wal

if TYPE_CHECKING:
    from first_jupyter.gateway.router import Target

MAX_ID_CHARS = 256
"""The longest response id looked up in the file: engines' ids are a prefix and a uuid; a longer one is unknown."""
WRITE_INTERVAL_S = 0.05
"""How long ids gather before a commit: short, so that another process of a shared gateway soon finds them."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY,
    response_id TEXT NOT NULL UNIQUE,
    cluster TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    user TEXT NOT NULL,
    ts REAL NOT NULL,
    answer BLOB,
    input BLOB
);
"""
_KEEP = "UPDATE responses SET answer = ?, input = ? WHERE response_id = ?"
_COLUMNS = "response_id, cluster, endpoint, model, user, ts"
_INSERT_ROW = f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"  # noqa: S608 (names)
_INSERT_BATCH = (f"INSERT OR REPLACE INTO responses ({_COLUMNS}) SELECT "  # noqa: S608 (names)
                 + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(6)) + " FROM json_each(?)")
_DELETE_BATCH = "DELETE FROM responses WHERE response_id IN (SELECT value FROM json_each(?))"
_BOUND = "DELETE FROM responses WHERE seq <= (SELECT MAX(seq) FROM responses) - ?"


def _storable(text: str) -> bool:
    """Whether SQLite can take ``text`` (a lone surrogate, which a path may decode to, cannot be UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class ResponseHome(NamedTuple):
    """Where one response was created, and for whom; a tuple, so it is the row the store takes."""

    response_id: str
    cluster: str
    endpoint: str
    model: str
    """The public model name the client asked for (the engine's own name is renamed to it in answers)."""
    user: str
    """Who asked, at a shared gateway; empty in a user's own server."""
    ts: float


class KeptCopy(NamedTuple):
    """The gateway's copy of a response: the whole response (JSON, the model renamed) and the request's input."""

    response_id: str
    answer: bytes
    input: bytes
    """The request's ``input`` as JSON (``null`` when it had none)."""


class ResponseBook:
    """The response ids this gateway relayed, the newest ``most`` of them, with where each was created: held in
    memory, kept in a store of the subclass's (one host's SQLite file, or replicas' PostgreSQL)."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._homes: OrderedDict[str, ResponseHome | None] = OrderedDict()
        """The newest ids, oldest first: this process's own, and those read from the store since; None for one
        deleted here (the store may hold it until the writer's next commit, and must not be read for it)."""

    def _store(self, item: ResponseHome | KeptCopy | str) -> None:
        """Keep a home, a copy or a deletion (an id), off the request path."""
        raise NotImplementedError

    async def _fetch(self, response_id: str) -> ResponseHome | None:
        """An id from the store (another process's, or this one's before a restart)."""
        raise NotImplementedError

    async def _fetch_copy(self, response_id: str) -> KeptCopy | None:
        """A copy from the store, once what this process handed it is written."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Write what waits (within a bound), then let the store go."""
        raise NotImplementedError

    async def settled(self) -> None:
        """Once what this process handed the store is written, where others read it at once (replicas): a
        deletion answered here must not be found by another replica a moment later. One host's processes share
        the store's file and this process's memory answers first, so nothing is waited for by default."""

    def remember(self, response_id: str, target: Target, model: str) -> None:
        """``response_id`` was created at ``target`` for the caller (``caller.current``): on the event loop, no
        I/O."""
        caller = current()
        home = ResponseHome(response_id, target.cluster, target.endpoint, model,
                            caller.user if caller is not None else "", time.time())
        self._hold(response_id, home)
        self._store(home)

    def remember_answer(self, body: bytes, target: Target, model: str, request: dict[str, Any]) -> None:
        """Remember the response a whole (non-streamed) answer holds, when it is one (an object with an id), and
        keep a copy of it (``keep``)."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        response_id = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(response_id, str):
            self.remember(response_id, target, model)
            self.keep(response_id, body, request)

    def keep(self, response_id: str, answer: bytes, request: dict[str, Any]) -> None:
        """Keep the gateway's copy of a relayed response, unless its request said ``store: false``."""
        if request.get("store", True) is not False:
            self._store(KeptCopy(response_id, answer, orjson.dumps(request.get("input"))))

    async def copy(self, response_id: str) -> KeptCopy | None:
        """The gateway's copy of a response, read from the file once the writer has committed what it holds (a
        call may follow its response at once); None when there is none (``store: false``, or a stream that
        never ended)."""
        if not (len(response_id) <= MAX_ID_CHARS and _storable(response_id)):
            return None
        return await self._fetch_copy(response_id)

    def forget(self, response_id: str) -> None:
        """The engine deleted it: a later call gets this gateway's 404 rather than a trip to the engine."""
        self._hold(response_id, None)
        self._store(response_id)

    async def home(self, response_id: object, field: str = "response_id") -> ResponseHome:
        """Where ``response_id`` was created; a 404 when it is unknown here or not the current caller's
        (``caller.current``; the same 404: whether someone else has such a response is not the caller's to learn).
        ``field``: the id's name in the error (``previous_response_id`` in a request body)."""
        if not isinstance(response_id, str):
            raise OpenAIError(400, f"Invalid value for '{field}': it must be a response id (a string), not "
                                   f"{json_kind(response_id)}.", param=field, code="invalid_value")
        if response_id in self._homes:
            home = self._homes[response_id]
        elif len(response_id) <= MAX_ID_CHARS and _storable(response_id):
            home = await self._fetch(response_id)
            if home is not None:
                self._hold(response_id, home)
        else:
            home = None
        caller = current()
        if home is None or (caller is not None and home.user != caller.user):
            raise OpenAIError(404, f"No response {shown(response_id)} is known to this gateway. It routes a response's "
                                   f"later calls to the endpoint that created it, so it knows only the responses it "
                                   f"relayed (the newest {self._most:,}: defaults.max_response_ids), and each caller "
                                   "only their own. Check the id, which responses.create returned.",
                              param=field, code="response_not_found")
        return home

    def _hold(self, response_id: str, home: ResponseHome | None) -> None:
        self._homes[response_id] = home
        self._homes.move_to_end(response_id)
        if len(self._homes) > self._most:
            self._homes.popitem(last=False)


class ResponseIds(ResponseBook):
    """A ``ResponseBook`` in SQLite under the data dir (one host's processes share the file)."""

    def __init__(self, path: Path, most: int, supervisor: Supervisor) -> None:
        super().__init__(most)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            use_wal(conn)
            conn.executescript(_SCHEMA)
        self._json: bool | None = None
        """Whether batches go in as JSON statements: known once the writer has its connection."""
        self._writer: QueuedWriter[ResponseHome | KeptCopy | str] = QueuedWriter(
            path, self._write, "response ids writer", supervisor, interval=WRITE_INTERVAL_S)

    def _store(self, item: ResponseHome | KeptCopy | str) -> None:
        self._writer.put(item)

    async def _fetch(self, response_id: str) -> ResponseHome | None:
        return await asyncio.to_thread(self._read, response_id)

    async def _fetch_copy(self, response_id: str) -> KeptCopy | None:
        return await asyncio.to_thread(self._read_copy, response_id)

    def flush(self, timeout: float = 5.0) -> None:
        self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self.close()

    def _read(self, response_id: str) -> ResponseHome | None:
        """An id from the file (another process's, or this one's before a restart), on a worker thread."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM responses WHERE response_id = ?",  # noqa: S608 (names)
                               (response_id,)).fetchone()
        return None if row is None else ResponseHome(*row)

    def _read_copy(self, response_id: str) -> KeptCopy | None:
        self._writer.flush()
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            row = conn.execute("SELECT response_id, answer, input FROM responses WHERE response_id = ? AND answer "
                               "IS NOT NULL", (response_id,)).fetchone()
        return None if row is None else KeptCopy(*row)

    def _write(self, conn: sqlite3.Connection, items: list[ResponseHome | KeptCopy | str]) -> None:
        """One batch on the writer's thread, a statement each (``json_available``): the ids remembered (homes),
        the copies kept, then those deleted (ids: an id is deleted after it was created), then the oldest rows
        beyond the bound."""
        if self._json is None:
            self._json = json_available(conn)
        homes = [item for item in items if isinstance(item, ResponseHome)]
        deleted = [item for item in items if isinstance(item, str)]
        copies = [(c.answer, c.input, c.response_id) for c in items if isinstance(c, KeptCopy)]
        if self._json:
            if homes:
                conn.execute(_INSERT_BATCH, (orjson.dumps(homes, default=tuple),))
            conn.executemany(_KEEP, copies)  # a few per batch: a copy comes with an answer, not with every event
            if deleted:
                conn.execute(_DELETE_BATCH, (orjson.dumps(deleted),))
        else:
            conn.executemany(_INSERT_ROW, homes)
            conn.executemany(_KEEP, copies)
            conn.executemany("DELETE FROM responses WHERE response_id = ?", [(d,) for d in deleted])
        conn.execute(_BOUND, (self._most,))


INPUT_ITEMS_LIMIT = (20, 100)
"""``input_items``' page size: its default and the most asked for (OpenAI's)."""


def answer_from_copy(copy: KeptCopy, method: str, action: str, query: dict[str, str]) -> bytes:
    """A call on a kept response answered from the gateway's copy, as OpenAI's API answers it: the response
    itself, its deletion, or a page of its input items (``limit``, ``order``, ``after``); a cancel is a 400,
    since a response the gateway holds whole has ended."""
    if action == "cancel":
        raise OpenAIError(400, "Only a response created with background=true can be cancelled, while it runs; this "
                               "one had ended when it was answered.", param="response_id", code="invalid_request")
    if action == "":
        if method == "DELETE":
            return orjson.dumps({"id": copy.response_id, "object": "response", "deleted": True})
        return copy.answer
    items = _input_items(copy)
    if query.get("order", "desc") == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [item.get("id") for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:page_limit(query, *INPUT_ITEMS_LIMIT)]
    return orjson.dumps(list_page(page, len(items) > len(page)))


def _input_items(copy: KeptCopy) -> list[dict[str, Any]]:
    """The request's input as items, oldest first: a text is one user message; items keep their own ids, and
    those without one are given one (``{response id}_in{n}``), so that pages can go on ``after`` them."""
    given = orjson.loads(copy.input)
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}]
    if not isinstance(given, list):
        return []
    items = []
    for n, item in enumerate(given):
        if isinstance(item, dict):
            content = item.get("content")
            if item.get("type", "message") == "message" and isinstance(content, str):
                item = {**item, "content": [{"type": "input_text", "text": content}]}
            items.append({"type": "message", "id": f"{copy.response_id}_in{n}", **item})
    return items


def continued_input(earlier: KeptCopy, given: Any) -> list[Any]:
    """The input of a next turn for an engine that keeps no responses: the earlier response's input and its output
    (what the engine would have recalled by ``previous_response_id``), then this turn's ``given`` input. An
    assistant message goes back as text, as a model is prompted with it; other output items (a function call)
    as they came, since a next turn answers them."""
    answer = orjson.loads(earlier.answer)
    output = answer.get("output") if isinstance(answer, dict) else None
    told: list[Any] = []
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict) or item.get("type") == "reasoning":
            continue  # an engine's own thoughts are not part of the conversation it is sent
        if item.get("type") == "message":
            parts = content if isinstance(content := item.get("content"), list) else []
            told.append({"role": item.get("role", "assistant"), "content": "".join(
                part.get("text", "") for part in parts if isinstance(part, dict))})
        else:
            told.append(item)
    return [*_as_items(orjson.loads(earlier.input)), *told, *_as_items(given)]


def _as_items(given: Any) -> list[Any]:
    """A request's ``input`` as a list of items: a text is one user message."""
    if given is None:
        return []
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return list(given) if isinstance(given, list) else [given]

