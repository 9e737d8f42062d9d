"""``%first`` / ``%%first`` in a real IPython shell, against the in-process gateway serving the fake upstream."""

from __future__ import annotations

import json
import subprocess
import sys
from xml.etree import ElementTree

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

from bench import load_ext

ANSWER = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "


def cell(shell: InteractiveShell, line: str, body: str | None = None) -> CapturedIO:
    """Run ``%first line`` (or ``%%first line`` with ``body``) and capture what it shows."""
    with capture_output() as captured:
        if body is None:
            shell.run_line_magic("first", line)
        else:
            shell.run_cell_magic("first", line, body)
    return captured


def test_chat_streams_into_a_live_display_then_leaves_the_whole_answer(shell, in_process):
    in_process.pace = 0.02
    shell.run_line_magic("config", "FirstMagics.refresh_interval = 0")
    shown = cell(shell, "chat", "Say hello")
    live, *updates, final = shown.outputs
    assert live.data == {"text/plain": ""}  # what nbval and a saved notebook keep of the live display
    assert [u.update for u in updates] == [True] * len(updates)
    assert len(updates) >= 5  # pieces were shown while the answer was being generated
    assert updates[0].data["text/plain"] == "tok0 "
    assert updates[-1].data == {"text/plain": ""}  # emptied once the answer stands on its own
    assert final.data == {"text/markdown": ANSWER, "text/plain": ANSWER}
    meta = final.metadata["first"]
    assert (meta["model"], meta["cluster"], meta["endpoint"], meta["completion_tokens"]) == (
        "fake-model", "remote", "fake", 8)
    assert meta["latency_s"] > 0
    assert not shown.stderr


def test_no_stream_shows_one_answer(shell):
    shown = cell(shell, "chat --no-stream -f text", "Say hello")
    (final,) = shown.outputs
    assert final.data == {"text/plain": ANSWER}


def test_prompt_fills_known_names_and_leaves_every_other_brace(shell, in_process):
    shell.user_ns.update(topic="cats", paper={"title": "x"})
    code = 'def f(d):\n    return {"a": d["b"]} | {k: v for k, v in d.items()}\nprint(f"{x!r}")'
    cell(shell, "chat --no-stream", f"About {{topic}} and {{unknown}}, {{{{literal}}}}, {{paper}}:\n{code}")
    sent = in_process.last_request_body["messages"][-1]["content"]
    assert sent == f"About cats and {{unknown}}, {{literal}}, {{'title': 'x'}}:\n{code}"


def test_options_reach_the_request(shell, in_process):
    cell(shell, "chat --no-stream -m fake-model -t 0.3 --max-tokens 5 -s 'be terse'", "hi")
    body = in_process.last_request_body
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("fake-model", 0.3, 5)
    assert body["messages"][0] == {"role": "system", "content": "be terse"}


def test_the_conversation_continues_until_new_or_reset(shell, in_process):
    cell(shell, "chat --no-stream", "first")
    cell(shell, "chat --no-stream", "second")
    assert [m["content"] for m in in_process.last_request_body["messages"]] == ["first", ANSWER, "second"]
    history = cell(shell, "history")
    assert "**You:** first" in history.outputs[0].data["text/markdown"]
    cell(shell, "chat --no-stream --new", "third")
    assert [m["content"] for m in in_process.last_request_body["messages"]] == ["third"]
    assert "Conversation cleared." in cell(shell, "reset").stdout
    assert "No conversation yet" in cell(shell, "history").stdout
    shell.run_line_magic("config", "FirstMagics.history_turns = 0")
    cell(shell, "chat --no-stream", "fourth")
    cell(shell, "chat --no-stream", "fifth")
    assert [m["content"] for m in in_process.last_request_body["messages"]] == ["fifth"]


def test_settings_are_traitlets(shell, in_process):
    shell.run_line_magic("config", "FirstMagics.format = 'text'")
    shell.run_line_magic("config", "FirstMagics.stream = False")
    shell.run_line_magic("config", "FirstMagics.temperature = 1.5")
    (final,) = cell(shell, "chat", "hi").outputs
    assert final.data == {"text/plain": ANSWER}
    assert in_process.last_request_body["temperature"] == 1.5


def test_code_format_offers_the_code_as_the_next_cell(shell):
    shown = cell(shell, "chat --no-stream -f code", "write code")
    assert shown.outputs[0].data["text/plain"] == ANSWER.strip()
    assert shell.rl_next_input == ANSWER.strip()


def test_json_format_says_when_the_answer_is_not_json(shell):
    shown = cell(shell, "chat --no-stream -f json", "give json")
    assert shown.outputs[0].data == {"text/plain": ANSWER}
    assert "not valid JSON" in shown.stderr


def test_complete_and_embed(shell):
    (answer,) = cell(shell, "complete -f text", "Once upon a time").outputs
    assert answer.data["text/plain"]
    shown = cell(shell, "embed -m fake-embed --as vectors", "first line\n\n second line \n")
    assert "2 embedding(s)" in shown.stdout
    vectors = shell.user_ns["vectors"]
    assert len(vectors) == 2
    assert all(isinstance(x, float) for x in vectors[0])


def test_models_status_use_and_usage(shell):
    models = cell(shell, "models").outputs[0].data["text/plain"]
    assert "* fake-model  hot" in models
    states, endpoints = (o.data["text/plain"] for o in cell(shell, "status").outputs)
    assert [line.split() for line in states.splitlines()[2:]] == [  # under the caption and the heading
        ["fake-model", "remote/fake", "hot", "hot"], ["fake-embed", "remote/fake", "hot", "hot"]]
    assert "remote   fake      http  online" in endpoints
    assert "in-process" in endpoints
    assert cell(shell, "warm fake-model").stdout.strip() == (
        "fake-model is hot on cluster 'remote' endpoint 'fake'. Nothing to start.")
    assert "is not served on cluster 'elsewhere'" in cell(shell, "warm fake-model --cluster elsewhere").stderr
    assert "Default model: fake-embed." in cell(shell, "use fake-embed").stdout
    assert "* fake-embed" in cell(shell, "models").outputs[0].data["text/plain"]
    assert "No requests recorded yet." in cell(shell, "usage").stdout
    cell(shell, "chat --no-stream -m fake-model", "hi")
    table, plot = cell(shell, "usage").outputs
    assert table.data["text/plain"].splitlines()[1].split()[:3] == ["fake-model", "1", "0"]
    # one well-formed document, or JupyterLab draws nothing (the text is our own: no untrusted XML)
    svg = ElementTree.fromstring(plot.data["image/svg+xml"])  # noqa: S314
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}rect")) == 2  # tokens and latency, one model each
    assert [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.get("font-weight")] == [
        "Tokens by model", "Mean latency by model"]


def test_help_lists_every_command_and_each_ones_options(shell):
    listing = cell(shell, "help").stdout
    for name in ("chat", "complete", "embed", "models", "status", "use", "history", "reset", "usage"):
        assert f"first {name}" in listing
    assert "--max-tokens" in cell(shell, "help chat").stdout


@pytest.mark.parametrize(("line", "body", "words"), [
    ("", None, "%first needs a command"),
    ("bogus", None, "no command 'bogus'"),
    ("chat", None, "write `%%first chat` on the first line"),
    ("chat -x 1", "hi", "unrecognized arguments: -x"),
    ("chat -f yaml", "hi", "invalid choice: 'yaml'"),
    ("chat", "   ", "The cell has no prompt"),
    ("chat -m gpt-9", "hi", "`%first models` lists what you can use."),
    ("embed -m fake-model", "x", "`%first models` lists what each model can do."),
    ("embed --as 'not a name'", "x", "is not a Python variable name"),
    ("use gpt-9", None, "Available models: fake-embed, fake-model"),
    ("chat 'unclosed", "hi", "Quote values with spaces"),
])
def test_errors_are_one_or_two_lines_that_say_what_to_do(shell, line, body, words):
    shown = cell(shell, line, body)
    assert words in shown.stderr
    assert len(shown.stderr.strip().splitlines()) <= 2
    assert "Traceback" not in shown.stderr + shown.stdout
    assert not shown.outputs


def test_output_metadata_is_json(shell):
    (final,) = cell(shell, "chat --no-stream", "hi").outputs
    json.dumps(final.metadata)  # saved with the notebook: must serialise


def test_loading_the_extension_imports_nothing_heavy():
    """The client, ``openai`` (about 1 s to import) and the gateway load on first use, not on ``%load_ext``."""
    probe = ("import sys; from IPython.core.interactiveshell import InteractiveShell; "
             "shell = InteractiveShell.instance(); before = set(sys.modules); "
             "shell.run_line_magic('load_ext', 'first_jupyter'); "
             f"print(sorted(m for m in set(sys.modules) - before if m.startswith({load_ext.HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_settings_come_from_ipython_config_files_too(in_process):
    """``c.FirstMagics.format = "text"`` in an ipython_config.py reaches the magics through the shell's config."""
    from traitlets.config import Config

    config = Config()
    config.FirstMagics.format = "text"
    config.FirstMagics.stream = False
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance(config=config)
    try:
        shell.run_line_magic("load_ext", "first_jupyter")
        (final,) = cell(shell, "chat", "hi").outputs
        assert final.data == {"text/plain": ANSWER}
    finally:
        InteractiveShell.clear_instance()
