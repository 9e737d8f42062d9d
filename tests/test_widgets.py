"""The notebook widgets against a real in-process gateway in front of the fake upstream.

Only the frontend is missing: widgets get comms that record what they would send it, and the tests play its part
(a choice in the dropdown, a click) by handing the widgets the messages a frontend sends, through those comms.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import comm
import ipywidgets
import pytest
from comm.base_comm import BaseComm

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter import client
from first_jupyter.widgets import ChatWidget, ModelPicker
from first_jupyter.widgets import chat as chat_module
from first_jupyter.widgets.chat import PUSH_INTERVAL_S
from tests.conftest import closed_port, fake_cluster_config, without_a_server
from tests.waiting import eventually

HELD = 3600.0
"""A pace of the fake upstream that no test outlasts: set while a stream runs, it holds the rest of the answer until
the gateway goes away."""
LONG = 1200
"""Pieces of an answer that streams for a minute: far longer than a test takes to see its first pieces."""

# an answer thread that dies of an exception fails the test, instead of only printing a traceback
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@dataclass(frozen=True)
class Sent:
    """One message a widget published for the frontend."""

    comm_id: str
    msg_type: str
    data: dict[str, Any]
    at: float
    """``RecordingComm.clock()`` when it was published: what the frontend saw, and when."""


class RecordingComm(BaseComm):
    """A comm whose frontend is a list: each message a widget publishes is kept, in order."""

    clock: ClassVar[Callable[[], float]] = time.monotonic
    """What stamps each message; a test of a widget's own timing sets the clock that widget reads."""

    def __init__(self, sent: list[Sent], **kwargs: Any) -> None:
        self.sent = sent  # before BaseComm's constructor, which publishes comm_open
        super().__init__(**kwargs)

    def publish_msg(self, msg_type: str, data: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                    buffers: list[bytes] | None = None, **keys: Any) -> None:
        self.sent.append(Sent(self.comm_id, msg_type, data or {}, type(self).clock()))


class SteppingClock:
    """A clock for the chat widget that moves ``step`` seconds on each reading, so that its push throttle decides
    the same way on any machine and however the stream's pieces bunch up on their way."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0
        """The last reading: while a push publishes, the time that push read."""

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture(autouse=True)
def sent(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[list[Sent]]:
    """Every widget's messages to the frontend; and a widget callback that raised fails the test.

    ipywidgets catches what its callbacks raise and logs it (or shows it in the cell, when a shell runs): the
    shell is hidden from it so that it always logs, where it can be seen.
    """
    messages: list[Sent] = []
    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: RecordingComm(messages, **kwargs))
    monkeypatch.setattr(ipywidgets.widgets.widget, "get_ipython", lambda: None)
    caplog.set_level(logging.WARNING, logger="traitlets")
    yield messages
    ipywidgets.Widget.close_all()
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def states(sent: list[Sent], widget: ipywidgets.Widget, key: str) -> list[Sent]:
    """The messages that gave the frontend ``key`` of ``widget``: its opening state, then its updates."""
    return [m for m in sent if m.comm_id == widget.model_id and key in m.data.get("state", {})
            and (m.msg_type == "comm_open" or m.data.get("method") == "update")]


def from_frontend(widget: ipywidgets.Widget, data: dict[str, Any]) -> None:
    """Hand ``widget`` a message as the frontend sends it when the user acts."""
    widget.comm.handle_msg({"content": {"data": data}, "buffers": []})


def choose(dropdown: ipywidgets.Dropdown, model: str) -> None:
    index = [value for _label, value in dropdown.options].index(model)
    from_frontend(dropdown, {"method": "update", "state": {"index": index}, "buffer_paths": []})


def click(button: ipywidgets.Button) -> None:
    from_frontend(button, {"method": "custom", "content": {"event": "click"}})


def gateway_config(upstream: FakeUpstream, *, second_chat_model: bool = True) -> dict[str, Any]:
    """Chat models ``fake-model`` and ``fake-chat-2`` (the default) and ``fake-embed`` on the fake upstream, and
    ``far-model`` on an endpoint that is down."""
    config = fake_cluster_config(upstream, model="fake-chat-2" if second_chat_model else "fake-model")
    if second_chat_model:
        config["clusters"]["remote"]["endpoints"][0]["models"].append({"id": "fake-chat-2"})
    config["clusters"]["down"] = {"backend": "http", "endpoints": [{
        "name": "gone", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "models": [{"id": "far-model"}]}]}
    return config


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
          write_config: Callable[[dict[str, Any]], Path]) -> Iterator[Callable[..., FakeUpstream]]:
    """Start a fake upstream (``chunks`` tokens, ``pace`` seconds apart) with the client pointed at an in-process
    gateway in front of it, which the widgets' first call starts."""
    without_a_server(monkeypatch, tmp_path / "data")
    with contextlib.ExitStack() as upstreams:

        def start(chunks: int = 8, pace: float = 0.0) -> FakeUpstream:
            upstream = upstreams.enter_context(serving_in_thread(models=["fake-model", "fake-embed"], chunks=chunks,
                                                                pace=pace))
            monkeypatch.setenv("FIRST_CONFIG", str(write_config(gateway_config(upstream))))
            return upstream

        try:
            yield start
        finally:
            client.disconnect()  # before the upstream stops


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The client pointed at a gateway that is not there, as in a kernel whose Jupyter server went away."""
    monkeypatch.setenv(client.GATEWAY_URL_ENV, f"http://127.0.0.1:{closed_port()}/first/v1")
    monkeypatch.setenv(client.API_KEY_ENV, "first-not-a-key")
    client.disconnect()
    yield
    client.disconnect()


def tokens(count: int, start: int = 0) -> str:
    """What the fake upstream streams: ``tok0 tok1 ...``."""
    return "".join(f"tok{i} " for i in range(start, count))


# -- ModelPicker --------------------------------------------------------------------------------------------------


def test_picker_lists_the_chat_models_with_their_state_and_starts_on_the_default(serve, sent):
    serve()
    picker = ModelPicker()
    labels = {"fake-model (hot)": "fake-model", "fake-chat-2 (hot)": "fake-chat-2",
              "far-model (offline)": "far-model"}
    assert dict(picker.dropdown.options) == labels
    assert picker.value == "fake-chat-2" == client.default_model()
    assert picker.error_line.value == ""
    # what the frontend got: the labels with their states, and the default selected
    last = states(sent, picker.dropdown, "_options_labels")[-1].data["state"]
    assert sorted(last["_options_labels"]) == sorted(labels)
    assert last["_options_labels"][last["index"]] == "fake-chat-2 (hot)"
    # the last expression of a cell displays the widget
    view = picker._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == picker.widget.model_id

    assert "fake-embed (hot)" not in labels
    assert dict(ModelPicker(capability=None).dropdown.options) == {**labels, "fake-embed (hot)": "fake-embed"}


def test_a_choice_becomes_the_gateway_default_only_with_set_default(serve):
    serve()
    picker = ModelPicker()
    choose(picker.dropdown, "fake-model")
    assert picker.value == "fake-model"
    assert client.default_model() == "fake-chat-2"

    setter = ModelPicker(set_default=True)
    choose(setter.dropdown, "fake-model")
    assert setter.value == "fake-model"
    assert client.default_model() == "fake-model"
    assert setter.error_line.value == ""


def test_refresh_follows_a_default_changed_elsewhere_but_keeps_the_users_choice(serve):
    serve()
    picker = ModelPicker()
    client.set_default_model("fake-model")  # %first use, the sidebar, another notebook
    assert picker.value == "fake-chat-2"
    click(picker.refresh_button)
    assert picker.value == "fake-model"

    choose(picker.dropdown, "far-model")
    client.set_default_model("fake-chat-2")
    click(picker.refresh_button)
    assert picker.value == "far-model"


# -- ChatWidget ---------------------------------------------------------------------------------------------------


def test_chat_streams_the_answer_into_the_transcript(serve, sent, monkeypatch):
    serve(chunks=30)
    # the widget's clock moves 0.3 push intervals per reading (one per piece, one per push): a push every 4th piece
    clock = SteppingClock(PUSH_INTERVAL_S * 0.3)
    monkeypatch.setattr(chat_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(RecordingComm, "clock", lambda: clock.now)
    chat = ChatWidget()
    chat.prompt.value = "Tell me a story"
    click(chat.send_button)
    assert chat.prompt.value == ""
    assert (chat.send_button.disabled, chat.stop_button.disabled, chat.clear_button.disabled) == (True, False, True)
    assert chat.wait(30)

    answer = tokens(30)
    result = chat.last_result
    assert result is not None
    assert (result.text, result.model, result.stopped) == (answer, "fake-chat-2", False)
    assert chat.transcript_text == f"You: Tell me a story\nfake-chat-2: {answer}"
    assert (chat.send_button.disabled, chat.stop_button.disabled, chat.clear_button.disabled) == (False, True, False)
    status = chat.status.value
    assert status.startswith("fake-chat-2 · remote/fake · 8 prompt + 30 completion tokens · ")
    assert f"{result.latency_s:.2f} s" in status

    # the frontend saw the answer grow while it streamed, at most every PUSH_INTERVAL_S of the widget's clock
    pushed = states(sent, chat.transcript, "value")
    assert html.escape(answer) in pushed[-1].data["state"]["value"]
    partial = [m for m in pushed if "tok0" in m.data["state"]["value"] and "tok29" not in m.data["state"]["value"]]
    assert len(partial) >= 3
    gaps = [b.at - a.at for a, b in itertools.pairwise(partial)]
    assert min(gaps) >= PUSH_INTERVAL_S
    lengths = [len(m.data["state"]["value"]) for m in partial]
    assert lengths == sorted(lengths)


def test_a_second_prompt_continues_the_conversation_until_new_chat(serve):
    upstream = serve()
    chat = ChatWidget()
    chat.send("What is 2+2?")
    assert chat.wait(30)
    chat.send("And times 3?")
    assert chat.wait(30)
    assert upstream.last_request_body["messages"] == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": tokens(8)},
        {"role": "user", "content": "And times 3?"}]
    assert chat.transcript_text.splitlines() == [
        "You: What is 2+2?", f"fake-chat-2: {tokens(8)}", "You: And times 3?", f"fake-chat-2: {tokens(8)}"]

    click(chat.clear_button)
    assert (chat.transcript_text, chat.transcript.value, chat.conversation.turns) == ("", "", [])
    chat.send("Hello again")
    assert chat.wait(30)
    assert upstream.last_request_body["messages"] == [{"role": "user", "content": "Hello again"}]


def test_stop_ends_the_answer_and_the_upstream_request(serve):
    upstream = serve(chunks=LONG, pace=0.05)  # a minute unless stopped
    chat = ChatWidget()
    chat.send("Write a long essay")
    eventually(lambda: "tok3 " in chat.transcript.value, "tok3 shown")
    upstream.pace = HELD  # the upstream sends at most one piece more, then holds the rest until the gateway leaves
    assert upstream.active == 1
    assert not chat.stop_button.disabled

    click(chat.stop_button)
    assert chat.wait(30)  # the answer was held upstream: only stop could end it
    result = chat.last_result
    assert result is not None
    assert result.stopped
    assert result.text.startswith(tokens(4))
    assert len(result.text) < len(tokens(LONG))
    assert chat.transcript_text == f"You: Write a long essay\nfake-chat-2: {result.text.rstrip()} [stopped]"
    assert chat.status.value.endswith(" · stopped")
    assert chat.conversation.turns == [("Write a long essay", result.text)]
    # the gateway closed the upstream request too (which would have held it for hours)
    eventually(lambda: len(upstream.disconnects) > 0 and upstream.active == 0, "the upstream request cancelled")


def test_a_model_the_gateway_no_longer_serves_is_one_line_in_the_widgets(serve, write_config):
    upstream = serve()
    picker = ModelPicker(set_default=True)
    chat = ChatWidget()
    # the gateway restarts without fake-chat-2; the widgets still list it until refreshed
    write_config(gateway_config(upstream, second_chat_model=False))
    client.disconnect()

    chat.send("Hello?")
    assert chat.wait(30)
    assert chat.status.value.startswith("The model 'fake-chat-2' does not exist here.")
    assert "\n" not in chat.status.value
    assert chat.last_result is None
    assert chat.conversation.turns == []
    assert chat.transcript_text == "You: Hello?\nfake-chat-2: [no answer]"
    assert (chat.send_button.disabled, chat.stop_button.disabled) == (False, True)

    choose(picker.dropdown, "fake-model")
    assert picker.error_line.value == ""
    choose(picker.dropdown, "fake-chat-2")
    assert picker.error_line.value.startswith("The model 'fake-chat-2' does not exist here.")
    assert client.default_model() == "fake-model"
    click(picker.refresh_button)
    assert dict(picker.dropdown.options) == {"fake-model (hot)": "fake-model", "far-model (offline)": "far-model"}
    assert (picker.value, picker.error_line.value) == ("fake-model", "")


def test_an_unreachable_gateway_is_one_line_in_the_widgets(unreachable):
    picker = ModelPicker()
    assert picker.error_line.value.startswith("The FIRST gateway at http://127.0.0.1:")
    assert "is not reachable" in picker.error_line.value
    assert "\n" not in picker.error_line.value
    assert (tuple(picker.dropdown.options), picker.value) == ((), None)

    chat = ChatWidget()
    chat.send("Anyone there?")
    assert chat.wait(30)
    assert "is not reachable" in chat.status.value
    assert "\n" not in chat.status.value
    assert chat.last_result is None
    assert chat.transcript_text == "You: Anyone there?\nmodel: [no answer]"
    assert (chat.send_button.disabled, chat.stop_button.disabled) == (False, True)
