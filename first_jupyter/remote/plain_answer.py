"""A plain (non-streamed) answer put together from the engine's stream of it, on the node.

The node asks its engine for a stream even when the client asked for a plain answer, so that it can stop the
work: an engine stops generating once a stream's reader goes away, while ``transformers serve`` carries a plain
request through to its end whoever still waits for it (``remote.leash``). The events are folded into the answer
the engine would have sent: the texts and a tool call's arguments joined, log-probabilities appended, and the
last value kept of everything else, fields this module does not know included (an engine's own, like vLLM's
``stop_reason``), so the answer keeps what the engine said.

Standard library only, like every module that travels to an endpoint.
"""

from __future__ import annotations

from typing import Any

JOINED = frozenset({"content", "text", "refusal", "reasoning_content", "reasoning", "arguments"})
"""Strings that come a piece per event; every other value comes whole (a role, an id, a finish reason)."""


def _fold(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one event's part of an object to what came before it."""
    for key, value in part.items():
        old = into.get(key)
        if value is None:
            into.setdefault(key, None)
        elif isinstance(value, str) and isinstance(old, str) and key in JOINED:
            into[key] = old + value
        elif isinstance(value, dict) and isinstance(old, dict):
            _fold(old, value)
        elif isinstance(value, list) and isinstance(old, list):
            _fold_list(old, value)
        else:
            into[key] = value


def _fold_list(into: list[Any], part: list[Any]) -> None:
    """Items with an ``index`` (tool calls) are one item told over several events; others (log-probabilities of
    each token) follow those before them."""
    for item in part:
        if isinstance(item, dict) and "index" in item:
            same = next((o for o in into if isinstance(o, dict) and o.get("index") == item["index"]), None)
            if same is not None:
                _fold(same, item)
                continue
        into.append(item)


class PlainAnswer:
    """The answer so far; ``add`` each event's JSON as it comes, ``body`` at the end."""

    def __init__(self, chat: bool) -> None:
        self._chat = chat
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.error: Any = None
        """What an error event said (engines report a failure after the first byte in the stream)."""

    def add(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        if "error" in event and "choices" not in event:
            self.error = event["error"]
            return
        for key, value in event.items():
            if key == "choices":
                for choice in value if isinstance(value, list) else ():
                    if isinstance(choice, dict):
                        self._choice(choice)
            elif key != "object" and (value is not None or key not in self._top):
                self._top[key] = value

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        into = self._choices.get(index)
        if into is None:
            start: dict[str, Any] = {"message": {"role": "assistant", "content": None}} if self._chat else {"text": ""}
            into = self._choices[index] = {"index": index, **start, "logprobs": None, "finish_reason": None}
        delta = choice.get("delta")
        if isinstance(delta, dict):
            _fold(into["message"], delta)
        _fold(into, {key: value for key, value in choice.items() if key not in ("delta", "index")})

    def finished(self) -> bool:
        """Whether every choice has come to its end (a stream cut short has one that has not)."""
        return bool(self._choices) and all(c.get("finish_reason") is not None for c in self._choices.values())

    def body(self) -> dict[str, Any]:
        """The whole answer, as the engine's plain answer is shaped (a plain tool call has no ``index``)."""
        top = dict(self._top)
        return {"id": top.pop("id", None), "object": "chat.completion" if self._chat else "text_completion", **top,
                "choices": [_plain(self._choices[i]) for i in sorted(self._choices)]}


def _plain(choice: dict[str, Any]) -> dict[str, Any]:
    """A choice without what only its stream needed: the place of each tool call among the events."""
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(calls := message.get("tool_calls"), list):
        return choice
    plain_calls = [{k: v for k, v in c.items() if k != "index"} if isinstance(c, dict) else c for c in calls]
    return {**choice, "message": {**message, "tool_calls": plain_calls}}
