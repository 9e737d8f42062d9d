"""Every line of a batch's input checked before any is sent: a file with a bad line runs nothing, and its errors
say which lines and what is wrong, so the user fixes the file once rather than learning of each line from a
failed request hours into the run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from first_jupyter.protocol import (
    ANTHROPIC,
    MAX_NESTING,
    Capability,
    OpenAIError,
    check_request,
    nests_deeper,
    shown,
    too_deep,
)

MAX_REPORTED = 100
"""Errors listed in the batch; the count says how many more there were."""
ENDPOINTS = {capability.path: capability for capability in Capability
             if capability.path.startswith("/v1/") and capability not in ANTHROPIC and not capability.takes_form}
"""A batch's ``endpoint``: the OpenAI routes (under ``/v1``), as OpenAI's batches and ``vllm run-batch`` take.
Not Anthropic's Messages (they have a batch API of their own, which this is not), nor the audio routes (a batch's
lines are JSON requests, and their bodies are forms)."""


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(slots=True)
class Checked:
    total: int = 0
    """Requests in the file (blank lines are not)."""
    errors: list[LineError] = field(default_factory=list)
    """The first ``MAX_REPORTED`` errors, in line order."""
    error_count: int = 0
    models: Counter[str] = field(default_factory=Counter)
    """Requests per model."""

    def add(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED:
            self.errors.append(error)


def check_line(item: Any, endpoint: str, served: Collection[str]) -> tuple[str, LineError | None]:
    """One parsed line's custom_id (empty when it has none) and what is wrong with it (line 0: the caller's)."""
    if not isinstance(item, dict):
        return "", LineError(0, "invalid_line", "The line is not a JSON object with custom_id, method, url and "
                                                "body.")
    if nests_deeper(item, MAX_NESTING + 1):  # (its body is one level down)
        return "", LineError(0, "invalid_request", too_deep().message, "body")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "", LineError(0, "missing_custom_id", "custom_id must be a non-empty string: it is how each "
                                                     "result finds its request.", "custom_id")
    if item.get("method") != "POST":
        return custom_id, LineError(0, "invalid_method", f"method is {shown(item.get('method'))}; it must be 'POST'.",
                                    "method")
    if item.get("url") != endpoint:
        return custom_id, LineError(0, "mismatched_url", f"url is {shown(item.get('url'))}, but this batch's endpoint "
                                                         f"is '{endpoint}': every line must use it.", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return custom_id, LineError(0, "invalid_body", "body must be the request, a JSON object.", "body")
    try:
        check_request(ENDPOINTS[endpoint], body)
    except OpenAIError as exc:
        return custom_id, LineError(0, "invalid_request", exc.message, f"body.{exc.param}" if exc.param else "body")
    model = body.get("model")
    if model not in served:
        known = ", ".join(sorted(served)[:20]) or "none"
        return custom_id, LineError(0, "model_not_found", f"body.model {model!r} is not served here for {endpoint}. "
                                                          f"Models: {known}.", "body.model")
    if body.get("stream"):
        return custom_id, LineError(0, "stream_not_allowed", "body.stream must not be true in a batch: each "
                                                             "result is written whole.", "body.stream")
    return custom_id, None


def check_file(path: Path, endpoint: str, served: Collection[str]) -> Checked:
    """Every line of ``path``; read as a stream, keeping a number per custom_id (to find repeats), not the
    lines."""
    checked = Checked()
    first_seen: dict[int, int] = {}
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            checked.total += 1
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                checked.add(LineError(number, "invalid_json", f"The line is not JSON ({exc})."))
                continue
            custom_id, error = check_line(item, endpoint, served)
            if custom_id:
                key = hash(custom_id)
                if key in first_seen:
                    error = LineError(number, "duplicate_custom_id", f"custom_id {custom_id!r} is also on line "
                                                                     f"{first_seen[key]}: each must be unique.",
                                      "custom_id")
                else:
                    first_seen[key] = number
            if error is not None:
                checked.add(LineError(number, error.code, error.message, error.param))
            else:
                checked.models[item["body"]["model"]] += 1
    return checked
