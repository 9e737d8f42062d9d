"""A chat with a gateway model inside a notebook, its answer streaming in while the kernel stays free."""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets

from first_jupyter import client
from first_jupyter.widgets.picker import ERROR_COLOR, ModelPicker, one_line

PUSH_INTERVAL_S = 0.1
"""Streamed text reaches the frontend at most this often: each push resends the whole transcript, and a
frontend redrawing on every token of a fast model falls behind it."""


@dataclass
class _Turn:
    """A prompt and its answer as the transcript shows them, kept apart from the conversation: a turn that got no
    answer is shown, but never sent again with the next prompt."""

    prompt: str
    model: str | None
    """None until the answer says which model the gateway's default was."""
    answer: str = ""
    note: str = ""
    """Why the answer is not whole: ``stopped``, ``no answer``."""

    def lines(self) -> tuple[str, str]:
        answer = f"{self.answer.rstrip()} [{self.note}]".lstrip() if self.note else self.answer
        return f"You: {self.prompt}", f"{self.model or 'model'}: {answer}"

    def html(self) -> str:
        note = f' <i style="opacity: 0.7">[{self.note}]</i>' if self.note else ""
        return (f'<div style="margin: 0.4em 0"><b>You</b><div style="white-space: pre-wrap">'
                f"{html.escape(self.prompt)}</div></div>"
                f'<div style="margin: 0.4em 0"><b>{html.escape(self.model or "model")}</b>'
                f'<div style="white-space: pre-wrap">{html.escape(self.answer)}{note}</div></div>')


def describe(result: client.Result) -> str:
    """The status line after an answer: which model, where it ran, what it cost and how long it took."""
    parts = [result.model, "/".join(p for p in (result.cluster, result.endpoint) if p) or "unknown endpoint"]
    if result.completion_tokens is not None:
        parts.append(f"{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens")
    first = f" (first token {result.ttft_s:.2f} s)" if result.ttft_s is not None else ""
    parts.append(f"{result.latency_s:.2f} s{first}")
    if result.stopped:
        parts.append("stopped")
    return " · ".join(parts)


class ChatWidget:
    """A model picker, a prompt, Send/Stop/New chat buttons, the transcript and a status line.

    The answer is asked for in a background thread: a kernel busy streaming could not take the Stop click, which
    the frontend sends as a message to the kernel. Stop closes the stream, so the gateway cancels the request
    upstream and the engine stops spending time on it. The turns so far go with each prompt (the last
    ``max_turns``) until New chat. Displays as the last expression of a cell; ``widget`` is the box to embed.
    """

    def __init__(self, *, max_turns: int = 10, set_default: bool = False) -> None:
        self.picker = ModelPicker(capability="chat", set_default=set_default)
        self.transcript = widgets.HTML(layout=widgets.Layout(max_height="28em", overflow="auto"))
        self.prompt = widgets.Textarea(placeholder="Ask something, then Send", rows=3,
                                       layout=widgets.Layout(width="100%"))
        self.send_button = widgets.Button(description="Send", icon="paper-plane", button_style="primary")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="Stop the answer; the gateway cancels it upstream")
        self.clear_button = widgets.Button(description="New chat", icon="eraser",
                                           tooltip="Forget the turns so far")
        self.status = widgets.Label()
        self.widget = widgets.VBox([self.picker.widget, self.transcript, self.prompt,
                                    widgets.HBox([self.send_button, self.stop_button, self.clear_button]),
                                    self.status])
        self.conversation = client.Conversation(max_turns)
        self.last_result: client.Result | None = None
        self._turns: list[_Turn] = []
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._pushed_at = 0.0
        self.send_button.on_click(lambda _button: self._send_clicked())
        self.stop_button.on_click(lambda _button: self.stop())
        self.clear_button.on_click(lambda _button: self.clear())

    @property
    def running(self) -> bool:
        """An answer is streaming."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def transcript_text(self) -> str:
        """The transcript as plain text, one line per prompt and per answer (``You: ...``, ``MODEL: ...``)."""
        return "\n".join(line for turn in self._turns for line in turn.lines())

    def send(self, prompt: str | None = None) -> threading.Thread:
        """Ask the chosen model ``prompt`` (the textarea's text when None, which is then emptied); returns the
        thread the answer streams in, so that code can join it (``wait``)."""
        if self.running:
            raise RuntimeError("An answer is still streaming: stop() or wait() first.")
        text = self.prompt.value if prompt is None else prompt
        if not text.strip():
            raise ValueError("Nothing to send: the prompt is empty.")
        if prompt is None:
            self.prompt.value = ""
        turn = _Turn(text, self.picker.value)
        self._turns.append(turn)
        self.last_result = None
        self._stop_event.clear()
        self._set_running(True)
        self._set_status(f"{turn.model or 'The default model'} is answering…")
        self._push()
        self._thread = threading.Thread(target=self._answer, args=(turn,), name="first-chat-widget", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """End the streaming answer; what came until then is kept, in the transcript and the conversation."""
        self._stop_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the streaming answer to end; False when it still streams after ``timeout`` seconds."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def clear(self) -> None:
        """Start a new chat: the transcript and the turns sent with the next prompt are forgotten."""
        if self.running:
            raise RuntimeError("An answer is still streaming: stop() or wait() first.")
        self.conversation.reset()
        self._turns.clear()
        self.last_result = None
        self._set_status("")
        self._push()

    def _send_clicked(self) -> None:
        """A click that raced the Send button's disabling, or came with nothing typed, does nothing."""
        if not self.running and self.prompt.value.strip():
            self.send()

    def _answer(self, turn: _Turn) -> None:
        """The background thread: stream the answer into the transcript, then report it in the status line."""

        bar = self.picker.start_bar

        def on_text(piece: str) -> None:
            if bar.last is not None:
                bar.clear()  # the start is over: the answer comes
            turn.answer += piece
            if time.monotonic() - self._pushed_at >= PUSH_INTERVAL_S:
                self._push()

        try:
            result = client.chat(turn.prompt, model=turn.model, stream=True, conversation=self.conversation,
                                 on_text=on_text, stop=self._stop_event, on_progress=bar.show)
        except Exception as exc:  # a widget reports, it never raises: here nothing would even show it
            turn.note = "no answer"
            self._set_status(one_line(exc), error=True)
        else:
            self.last_result = result
            turn.model, turn.answer = result.model, result.text
            turn.note = "stopped" if result.stopped else ""
            self._set_status(describe(result))
        finally:
            bar.clear()
            self._push()
            self._set_running(False)

    def _push(self) -> None:
        self._pushed_at = time.monotonic()
        self.transcript.value = "".join(turn.html() for turn in self._turns)

    def _set_running(self, running: bool) -> None:
        self.send_button.disabled = running
        self.stop_button.disabled = not running
        self.clear_button.disabled = running

    def _set_status(self, line: str, *, error: bool = False) -> None:
        self.status.style.text_color = ERROR_COLOR if error else None
        self.status.value = line

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """Displayed as its widget when it is the last expression of a cell."""
        bundle: dict[str, Any] | None = self.widget._repr_mimebundle_(**kwargs)
        return bundle
