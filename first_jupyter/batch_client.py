"""Batches from a notebook or a terminal: the calls behind ``%first batch``, ``first batch`` and ``BatchMonitor``.

A user has prompts in a list, a file of prompts, or a JSONL already in OpenAI's batch format; ``submit`` turns any
of them into the batch input (one request per line, ``custom_id`` ``request-N`` for the N-th item), uploads it as
it is read, and starts the batch. ``results`` gives the answers back in the input's order, one row per request,
as a pandas DataFrame when pandas is installed: a batch's output file is in the order requests finished, which is
no use for lining answers up with their prompts.
"""

from __future__ import annotations

import json
import math
import secrets
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from first_jupyter import client
from first_jupyter.client import GatewayError

FINAL_STATES = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
"""Short names for a batch's endpoint, as ``--endpoint`` takes them (the full path is taken too)."""
_PROMPT_FIELD = {"/v1/completions": "prompt", "/v1/embeddings": "input"}
_UPLOAD_CHUNK = 1 << 20

_latest_lock = threading.Lock()
_latest: str | None = None
"""The batch this process submitted last: the one ``status``, ``wait``, ``results`` and ``BatchMonitor`` mean
when given no id."""


def endpoint_path(endpoint: str) -> str:
    """``chat``, ``completions``, ``embeddings`` or a full path such as ``/v1/chat/completions``."""
    path = ENDPOINTS.get(endpoint, endpoint)
    if path not in ENDPOINTS.values():
        raise GatewayError(f"Endpoint {endpoint!r} is not one a batch can call; use chat, completions or embeddings "
                           f"(or {', '.join(ENDPOINTS.values())}).")
    return path


# -- building the input ---------------------------------------------------------------------------------------


def _request(item: Any, index: int, endpoint: str, model: str | None, fill: Mapping[str, Any]) -> dict[str, Any]:
    """One input line from one item: a batch line as is, a request body, or a prompt; ``fill`` goes into bodies
    that lack those fields (``max_tokens``, ``temperature``)."""
    if isinstance(item, Mapping) and "custom_id" in item:
        return {"method": "POST", "url": endpoint, **item}
    if isinstance(item, Mapping):
        body = dict(item)
    elif isinstance(item, str):
        field_name = _PROMPT_FIELD.get(endpoint)
        body = {field_name: item} if field_name else {"messages": [{"role": "user", "content": item}]}
    else:
        raise GatewayError(f"Item {index} is a {type(item).__name__}; a batch takes prompts (str), request bodies "
                           "(dict) or batch lines (dict with custom_id).")
    if "model" not in body:
        if model is None:
            raise GatewayError("No model for the requests: pass -m MODEL (or model=...), or put `model` in each "
                               "request body.")
        body["model"] = model
    body.update({k: v for k, v in fill.items() if k not in body})
    return {"custom_id": f"request-{index}", "method": "POST", "url": endpoint, "body": body}


def _file_items(path: Path) -> Iterator[Any]:
    """The items of a file: JSON values, one per line, in a ``.jsonl``/``.json`` file; otherwise one prompt per
    non-empty line."""
    jsonl = path.suffix in (".jsonl", ".json")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield line.rstrip("\n")
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise GatewayError(f"{path}, line {number}: not JSON ({exc}). A .jsonl file holds one JSON value "
                                   "per line; a file with another suffix, one prompt per line.") from None


def _batch_line(path: Path) -> dict[str, Any] | None:
    """The first request of a JSONL already in the batch format (it has a ``custom_id``): such a file is uploaded
    as it is, not rewritten. None for any other file."""
    if path.suffix not in (".jsonl", ".json"):
        return None
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return None
                return first if isinstance(first, dict) and "custom_id" in first else None
    return None


def write_input(items: Iterable[Any], dest: Path, endpoint: str, model: str | None,
                fill: Mapping[str, Any] | None = None) -> int:
    """Write the batch input for ``items`` to ``dest``; how many requests it holds."""
    count = 0
    with dest.open("w", encoding="utf-8") as out:
        for index, item in enumerate(items):
            out.write(json.dumps(_request(item, index, endpoint, model, fill or {}), ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise GatewayError("Nothing to submit: the prompts are empty.")
    return count


# -- calls ----------------------------------------------------------------------------------------------------


def _multipart(path: Path, filename: str) -> client.Payload:
    """``multipart/form-data`` with ``purpose=batch`` and the file, streamed from disk: an input can be hundreds
    of megabytes."""
    boundary = f"first-{secrets.token_hex(12)}"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as f:
            while chunk := f.read(_UPLOAD_CHUNK):
                yield chunk
        yield tail

    return client.Payload(chunks(), len(head) + path.stat().st_size + len(tail),
                          f"multipart/form-data; boundary={boundary}")


def upload(path: Path, filename: str | None = None) -> dict[str, Any]:
    """Upload a batch input file; the file object (its ``id`` goes into ``create``)."""
    safe = (filename or path.name).replace('"', "").replace("\r", "").replace("\n", "")
    answer: dict[str, Any] = client.v1("POST", "files", _multipart(path, safe))
    return answer


def submit(source: str | Path | Iterable[Any], *, model: str | None = None, endpoint: str | None = None,
           completion_window: str = "24h", metadata: Mapping[str, str] | None = None,
           max_tokens: int | None = None, temperature: float | None = None) -> dict[str, Any]:
    """Start a batch; the batch object as created.

    ``source`` is a path (a JSONL in OpenAI's batch format goes as it is; a ``.jsonl`` of request bodies or JSON
    strings, or a text file of one prompt per line, is turned into one) or the items themselves: prompts, request
    bodies or batch lines. ``model`` fills in bodies that name none (default: the gateway's default model);
    ``endpoint`` is chat (the default), completions or embeddings, or the lines' own ``url`` for a batch file.
    ``max_tokens`` and ``temperature`` go into the requests built here that do not set them.
    """
    global _latest
    if isinstance(source, Mapping) or hasattr(source, "columns"):
        raise GatewayError(f"A batch takes a list of requests, not a {type(source).__name__}: pass a list, or one "
                           "column of a DataFrame (df['prompt']).")
    path = Path(source).expanduser() if isinstance(source, str | Path) else None
    if path is not None and not path.is_file():
        raise GatewayError(f"No file {path}: give the path of a JSONL batch file or a file of prompts (one per "
                           "line).")
    first = _batch_line(path) if path is not None else None
    if path is not None and first is not None:
        if max_tokens is not None or temperature is not None:
            raise GatewayError(f"{path} is a batch file: its lines are sent as they are, so set max_tokens and "
                               "temperature in their bodies (the options apply to prompts and request bodies).")
        url = first.get("url")
        chosen = endpoint_path(endpoint) if endpoint else (url if isinstance(url, str) else ENDPOINTS["chat"])
        stored = upload(path)
    else:
        chosen = endpoint_path(endpoint or "chat")
        items = _file_items(path) if path is not None else source
        named = model or client.default_model()
        with tempfile.TemporaryDirectory(prefix="first-batch-") as scratch:
            built = Path(scratch) / f"{path.stem if path else 'prompts'}.jsonl"
            fill = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
            write_input(items, built, chosen, named, fill)  # type: ignore[arg-type]  # no path: source is no Path
            stored = upload(built)
    body: dict[str, Any] = {"input_file_id": stored["id"], "endpoint": chosen, "completion_window": completion_window}
    if metadata:
        body["metadata"] = dict(metadata)
    batch: dict[str, Any] = client.v1("POST", "batches", body)
    with _latest_lock:
        _latest = batch["id"]
    return batch


def latest_id(given: str | None = None) -> str:
    """``given``, else the batch this process submitted last, else the newest batch the gateway has."""
    if given:
        return given
    with _latest_lock:
        if _latest is not None:
            return _latest
    newest = client.v1("GET", "batches?limit=1")["data"]
    if not newest:
        raise GatewayError("No batch yet: submit one with `%first batch submit PROMPTS -m MODEL` (or `first batch "
                           "submit FILE`).")
    found: str = newest[0]["id"]
    return found


def _quoted(batch_id: str) -> str:
    return urllib.parse.quote(batch_id, safe="")


def get(batch_id: str | None = None, *, conn: client.Connection | None = None) -> dict[str, Any]:
    """The batch as it stands (the latest one when no id is given), on ``conn``'s gateway when given."""
    found: dict[str, Any] = client.v1("GET", f"batches/{_quoted(latest_id(batch_id))}", conn=conn)
    return found


def listing(limit: int = 20) -> dict[str, Any]:
    """``GET /first/v1/batches`` as the gateway answers it: a list object of the newest batches, newest first."""
    found: dict[str, Any] = client.v1("GET", f"batches?limit={limit}")
    return found


def listed(limit: int = 20) -> list[dict[str, Any]]:
    """The newest batches, newest first."""
    found: list[dict[str, Any]] = listing(limit)["data"]
    return found


def cancel(batch_id: str | None = None, *, conn: client.Connection | None = None) -> dict[str, Any]:
    """Ask the batch to stop: requests in flight finish, the rest are reported as not run."""
    found: dict[str, Any] = client.v1("POST", f"batches/{_quoted(latest_id(batch_id))}/cancel", conn=conn)
    return found


# -- progress ---------------------------------------------------------------------------------------------------


@dataclass
class BatchProgress:
    """A batch's counts and rate across readings: the rate is measured between readings while it runs (the
    batch's own times are whole seconds), and over the whole run once it has ended."""

    batch: dict[str, Any] = field(default_factory=dict)
    rate: float | None = None
    _last: tuple[float, int] | None = None

    @property
    def done(self) -> int:
        counts = self.batch.get("request_counts") or {}
        return int(counts.get("completed", 0)) + int(counts.get("failed", 0))

    @property
    def total(self) -> int:
        return int((self.batch.get("request_counts") or {}).get("total", 0))

    @property
    def ended(self) -> bool:
        return self.batch.get("status") in FINAL_STATES

    def update(self, batch: dict[str, Any], now: float | None = None) -> None:
        self.batch = batch
        now = time.monotonic() if now is None else now
        if self.ended:
            started = batch.get("in_progress_at")
            finished = next((batch[k] for k in ("completed_at", "cancelled_at", "expired_at", "failed_at")
                             if batch.get(k)), None)
            self.rate = self.done / max(finished - started, 1) if started and finished and self.done else None
        elif self._last is not None and now > self._last[0] and self.done >= self._last[1]:
            measured = (self.done - self._last[1]) / (now - self._last[0])
            self.rate = measured if self.rate is None else 0.5 * self.rate + 0.5 * measured
        self._last = (now, self.done)

    def describe(self) -> str:
        """The batch, its status and ``summary``; then, for a failed batch, why."""
        line = f"{self.batch.get('id')}: {self.batch.get('status')}, {self.summary()}"
        return line + "\n" + describe_errors(self.batch) if self.batch.get("status") == "failed" else line

    def summary(self) -> str:
        """The counts, the rate and the time still expected, in one line."""
        counts = self.batch.get("request_counts") or {}
        parts = [f"{self.done} of {self.total} done"]
        if counts.get("failed"):
            parts.append(f"{counts['failed']} failed")
        if self.rate is not None and (self.done or self.ended):
            parts.append(f"{self.rate:,.1f} requests/s")
        if not self.ended and self.rate and self.total > self.done:
            parts.append(f"about {math.ceil((self.total - self.done) / self.rate)} s to go")
        return ", ".join(parts)


def describe_errors(batch: Mapping[str, Any]) -> str:
    """Why a batch failed: each reported problem with its line number."""
    errors = (batch.get("errors") or {}).get("data") or []
    return "\n".join(f"  line {e['line']}: {e['message']}" if e.get("line") else f"  {e['message']}"
                     for e in errors) or "  (no reason given)"


def wait(batch_id: str | None = None, *, every: float = 1.0,
         on_update: Callable[[BatchProgress], None] | None = None) -> dict[str, Any]:
    """Read the batch every ``every`` seconds until it ends; ``on_update`` sees each reading. The final batch."""
    chosen = latest_id(batch_id)
    progress = BatchProgress()
    while True:
        progress.update(get(chosen))
        if on_update is not None:
            on_update(progress)
        if progress.ended:
            return progress.batch
        time.sleep(every)


# -- results ------------------------------------------------------------------------------------------------------


RESULT_COLUMNS = ["custom_id", "prompt", "answer", "status_code", "error", "prompt_tokens", "completion_tokens"]


def _prompt(body: Mapping[str, Any]) -> Any:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping):
        return messages[-1].get("content")
    return body.get("prompt", body.get("input"))


def _answer(body: Mapping[str, Any]) -> Any:
    if body.get("object") == "list":  # embeddings
        vectors = [item.get("embedding") for item in body.get("data") or []]
        return vectors[0] if len(vectors) == 1 else vectors
    choice = (body.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")


def _result_row(line: Mapping[str, Any]) -> dict[str, Any]:
    response = line.get("response") or {}
    body = response.get("body") or {}
    status = response.get("status_code")
    error = line.get("error") or (body.get("error") if status and status >= 400 else None)
    usage = body.get("usage") or {}
    return {"answer": None if error else _answer(body), "status_code": status,
            "error": error.get("message") if isinstance(error, Mapping) else error,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


def _file_lines(file_id: str) -> Iterator[dict[str, Any]]:
    with client.v1_lines(f"files/{_quoted(file_id)}/content") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def result_rows(batch_id: str | None = None) -> list[dict[str, Any]]:
    """One row per request of an ended batch, in the input's order: its prompt, the answer (text, or the vector
    of an embedding), the HTTP status, the error (why it failed or was not run) and the tokens."""
    batch = get(batch_id)
    if batch["status"] not in FINAL_STATES:
        raise GatewayError(f"Batch {batch['id']} is {batch['status']}; its results come when it ends. `%first batch "
                           "wait` (or `first batch wait`) waits for it.")
    if batch["status"] == "failed" and not batch.get("output_file_id") and not batch.get("error_file_id"):
        raise GatewayError(f"Batch {batch['id']} failed before running anything:\n{describe_errors(batch)}")
    found: dict[str, dict[str, Any]] = {}
    for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
        if file_id:
            for line in _file_lines(file_id):
                found[line["custom_id"]] = _result_row(line)
    rows = []
    for line in _file_lines(batch["input_file_id"]):
        row = found.pop(line["custom_id"], None) or {"answer": None, "status_code": None, "error": "not run",
                                                     "prompt_tokens": None, "completion_tokens": None}
        rows.append({"custom_id": line["custom_id"], "prompt": _prompt(line.get("body") or {}), **row})
    return rows


def results(batch_id: str | None = None) -> Any:
    """A batch's answers in the input's order (``result_rows``), as a DataFrame when pandas is installed."""
    return frame(result_rows(batch_id))


def frame(rows: list[dict[str, Any]]) -> Any:
    """Result rows as a pandas DataFrame when pandas is installed, else as they are (a list of dicts)."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# -- the command line of both shells ------------------------------------------------------------------------------

BATCH_COLUMNS = ["batch", "status", "done", "failed", "endpoint", "created"]


def batch_row(batch: Mapping[str, Any]) -> list[Any]:
    counts = batch.get("request_counts") or {}
    done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
    return [batch["id"], batch["status"], f"{done}/{counts.get('total', 0)}", counts.get("failed", 0),
            batch["endpoint"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch["created_at"]))]
