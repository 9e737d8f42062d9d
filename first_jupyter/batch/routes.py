"""The Batch API's routes, matched and answered once for both doors (Jupyter's handlers and the gateway's own
server): an answer is a JSON object, or a file whose contents the door streams."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from first_jupyter.batch.service import Batches
from first_jupyter.batch.upload import Upload
from first_jupyter.protocol import OpenAIError

ROUTE = re.compile(r"^/first/v1/(files|batches)(?:/([^/]+))?(?:/(content|cancel))?/?$")
"""``/first/v1/files[/ID[/content]]`` and ``/first/v1/batches[/ID[/cancel]]``."""
_METHODS = {("files", False, None): ("GET", "POST"), ("files", True, None): ("GET", "DELETE"),
            ("files", True, "content"): ("GET",), ("batches", False, None): ("GET", "POST"),
            ("batches", True, None): ("GET",), ("batches", True, "cancel"): ("POST",)}


def matched(path: str) -> re.Match[str]:
    """``path`` as a batch route, or the 404 that lists them (a door whose own pattern is wider sends anything under
    files/ and batches/ here)."""
    match = ROUTE.match(path)
    if match is None:
        raise _unknown(path)
    return match


def _unknown(path: str) -> OpenAIError:
    return OpenAIError(404, f"No route {path}. Batch routes: files, files/ID, files/ID/content, batches, batches/ID "
                            "and batches/ID/cancel under /first/v1.", code="unknown_route")


def query_of(query: str) -> dict[str, str]:
    """A request's query string as its parameters (the last of a repeated one), percent-decoded as UTF-8; a 400
    naming the parameter whose value is not UTF-8 (``after=%FF``), rather than a guess at what it meant."""
    params: dict[str, str] = {}
    for name, raw in parse_qsl(query, encoding="latin-1"):
        try:
            params[name] = raw.encode("latin-1").decode()
        except UnicodeError:
            raise OpenAIError(400, f"The query parameter {name!r} is not percent-encoded UTF-8 text; send its value "
                                   "URL-encoded from UTF-8 (as every HTTP client library does).", param=name,
                              code="invalid_value") from None
    return params


def allowed(match: re.Match[str]) -> tuple[str, ...]:
    """The methods a matched path takes; none for a path the pattern matches but no route serves."""
    kind, item, action = match.groups()
    return _METHODS.get((kind, item is not None, action), ())


def is_upload(method: str, path: str) -> bool:
    """A body to stream to disk rather than hold: ``POST /files``."""
    return method == "POST" and path.rstrip("/") == "/first/v1/files"


async def answer(batches: Batches, method: str, match: re.Match[str], query: Mapping[str, str], body: bytes,
                 upload: Upload | None) -> dict[str, Any] | Path:
    kind, item, action = match.groups()
    methods = allowed(match)
    if not methods:
        raise _unknown(match.group(0))
    if method not in methods:
        raise OpenAIError(405, f"{method} is not allowed on {match.group(0)}; use {', '.join(methods)}.",
                          code="method_not_allowed", headers={"Allow": ", ".join(methods)})
    if kind == "files":
        if item is None:
            if method == "GET":
                return batches.files(query)
            if upload is None:
                raise OpenAIError(400, "The upload is missing: send the file as multipart/form-data.")
            return batches.add_file(upload)
        if action == "content":
            return batches.content(item)
        return batches.delete_file(item) if method == "DELETE" else batches.file(item).to_json()
    if item is None:
        return batches.batches(query) if method == "GET" else await batches.create(body)
    return batches.cancel(item) if action == "cancel" else batches.batch(item)
