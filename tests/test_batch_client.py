"""Batches from a notebook and a terminal: ``%first batch``, ``first batch`` and ``BatchMonitor``, against a real
in-process gateway (its Batch API and runner) in front of the fake upstream."""

from __future__ import annotations

import csv
import json
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

from first_jupyter import batch_client, cli, client
from first_jupyter.widgets import BatchMonitor
from tests.conftest import fake_cluster_config

ANSWER = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "


@pytest.fixture(autouse=True)
def _forget_the_latest_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_client, "_latest", None)


class _HeldEngine(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream whose chat answers wait until the test opens ``gate``: a batch's requests stay
    in flight, whatever the machine's speed, while the test does what must happen meanwhile (read the batch's
    status, cancel it). Its model list answers at once: the gateway reads it to know the endpoint's state."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's connection pool expects
    gate: ClassVar[threading.Event] = threading.Event()

    def do_GET(self) -> None:
        self._answer({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                  "owned_by": "test"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.gate.wait()
        self._answer({"id": "chatcmpl-held", "object": "chat.completion", "created": 0, "model": request["model"],
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                   "logprobs": None, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}})

    def _answer(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the gateway stopped while this waited: nobody is left to answer
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # a batch opens its whole window of connections at once


@pytest.fixture
def held(in_process: Any, write_config: Callable[[dict[str, Any]], Path]) -> Iterator[threading.Event]:
    """The in-process gateway in front of ``_HeldEngine``; the test opens the returned gate to let answers go."""
    gate = _HeldEngine.gate = threading.Event()
    server = _Server(("127.0.0.1", 0), _HeldEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    write_config(fake_cluster_config(SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}")))
    client.disconnect()  # the next call starts a gateway on this configuration
    try:
        yield gate
    finally:
        gate.set()  # answers still waiting go (or find their gateway gone), so the server can stop
        client.disconnect()
        server.shutdown()
        server.server_close()


def magic(shell: InteractiveShell, line: str) -> CapturedIO:
    with capture_output() as captured:
        shell.run_line_magic("first", line)
    return captured


def test_a_list_of_prompts_runs_as_a_batch_and_its_answers_come_back_in_order(shell, in_process):
    prompts = [f"question {i}" for i in range(12)]
    shell.user_ns["prompts"] = prompts
    shown = magic(shell, "batch submit prompts -m fake-model --wait")
    assert not shown.stderr
    batch_id = shown.stdout.split()[1]
    assert batch_id.startswith("batch_")
    assert shown.outputs[-1].data["text/plain"].startswith(f"{batch_id}: completed, 12 of 12 done")
    assert in_process.by_route["/v1/chat/completions"] == 12
    assert in_process.last_request_body["model"] == "fake-model"

    shown = magic(shell, "batch results --into answers")
    frame = shell.user_ns["answers"]
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == batch_client.RESULT_COLUMNS
    assert list(frame["prompt"]) == prompts  # the input's order, not the order answers came in
    assert list(frame["custom_id"]) == [f"request-{i}" for i in range(12)]
    assert set(frame["answer"]) == {ANSWER}
    assert set(frame["status_code"]) == {200}
    assert set(frame["completion_tokens"]) == {8}
    assert frame["error"].isna().all()
    table = shown.outputs[0].data["text/plain"]
    assert table.startswith("the first 10 of 12 results, 0 failed. All of them are in `answers`.")
    assert "question 9" in table
    assert "question 10" not in table


def test_request_bodies_keep_their_fields_and_get_the_default_model_and_options(shell, in_process):
    shell.user_ns["bodies"] = [{"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}]
    magic(shell, "batch submit bodies --max-tokens 7 -t 0.9 --wait")
    assert in_process.last_request_body == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
                                            "model": "fake-model", "max_tokens": 7}


def test_embeddings_come_back_as_vectors(shell, in_process):
    shell.user_ns["texts"] = ["a", "b", "c"]
    magic(shell, "batch submit texts -m fake-embed -e embeddings --wait")
    magic(shell, "batch results --into vectors")
    vectors = shell.user_ns["vectors"]["answer"]
    assert len(vectors) == 3
    assert all(isinstance(v, list) and len(v) > 1 and isinstance(v[0], float) for v in vectors)
    assert in_process.last_request_body == {"model": "fake-embed", "input": "c"}


def test_a_batch_file_goes_as_it_is_and_a_text_file_gives_one_prompt_per_line(shell, in_process, tmp_path):
    lines = [{"custom_id": f"mine-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "fake-model", "prompt": f"p{i}"}} for i in range(3)]
    batch_file = tmp_path / "input.jsonl"
    batch_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = magic(shell, f"batch submit {batch_file} --max-tokens 5").stderr
    assert "is a batch file: its lines are sent as they are" in refused
    shown = magic(shell, f"batch submit {batch_file} --wait")
    assert "(/v1/completions, window 24h)" in shown.stdout
    assert in_process.by_route["/v1/completions"] == 3
    rows = batch_client.result_rows()
    assert [(r["custom_id"], r["prompt"]) for r in rows] == [("mine-0", "p0"), ("mine-1", "p1"), ("mine-2", "p2")]
    stored = client.v1("GET", f"files/{batch_client.get()['input_file_id']}")
    assert stored["bytes"] == batch_file.stat().st_size  # uploaded byte for byte

    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first prompt\n\nsecond prompt\n")
    shell.user_ns["where"] = str(text_file)  # a variable holding a path is that file
    magic(shell, "batch submit where -m fake-model --wait")
    assert [r["prompt"] for r in batch_client.result_rows()] == ["first prompt", "second prompt"]


def test_without_pandas_the_results_are_a_list_of_dicts(shell, in_process, monkeypatch):
    shell.user_ns["prompts"] = ["x"]
    magic(shell, "batch submit prompts --wait")
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
    magic(shell, "batch results --into rows")
    (row,) = shell.user_ns["rows"]
    assert row["answer"] == ANSWER
    assert row["prompt"] == "x"


def test_status_list_and_cancel_of_a_slow_batch(shell, held):
    shell.user_ns["prompts"] = [f"q{i}" for i in range(200)]  # more than the endpoint's window of 64
    submitted = magic(shell, "batch submit prompts")
    batch_id = submitted.stdout.split()[1]
    status = magic(shell, f"batch status {batch_id}").stdout
    assert status.startswith(f"{batch_id}: ")
    assert "of" in status
    cancelled = magic(shell, "batch cancel").stdout  # no id: the one submitted last
    assert cancelled.startswith(f"{batch_id}: cancelling")
    held.set()  # only now is any request answered: those in flight finish, the rest must not be sent
    final = batch_client.wait(batch_id, every=0.2)
    assert final["status"] == "cancelled"
    counts = final["request_counts"]
    assert counts["completed"] <= 64  # at most those in flight when it was cancelled: one window
    assert counts["completed"] + counts["failed"] == 200
    rows = batch_client.result_rows(batch_id)
    not_run = [r for r in rows if r["status_code"] is None]
    assert len(not_run) == counts["failed"]
    assert all("cancel" in r["error"] for r in not_run)

    listed = magic(shell, "batch list").outputs[0].data["text/plain"].splitlines()
    assert listed[0].split() == batch_client.BATCH_COLUMNS
    assert listed[1].split()[:3] == [batch_id, "cancelled", "200/200"]


def test_a_batch_with_bad_lines_fails_and_says_which(shell, in_process):
    shell.user_ns["bodies"] = [{"model": "fake-model", "messages": []}, {"model": "no-such-model", "messages": []}]
    shown = magic(shell, "batch submit bodies --wait")
    final = shown.outputs[-1].data["text/plain"]
    assert ": failed, 0 of 2 done" in final
    assert "line 2:" in final
    assert "no-such-model" in final
    assert in_process.by_route["/v1/chat/completions"] == 0
    error = magic(shell, "batch results").stderr
    assert "failed before running anything" in error
    assert "line 2:" in error


@pytest.mark.parametrize(("line", "expected"), [
    ("batch submit nothing_here", "No variable or file named 'nothing_here'"),
    ("batch submit empty", "Nothing to submit"),
    ("batch submit one", "A batch takes a list of requests, not a dict"),
    ("batch submit frame", "one column of a DataFrame (df['prompt'])"),
    ("batch submit numbers", "Item 0 is a int"),
    ("batch submit prompts -e images", "Endpoint 'images' is not one a batch can call"),
    ("batch submit prompts -w forever", "completion_window 'forever' is not a duration"),
    ("batch results --into 2x", "--into '2x' is not a Python variable name."),
    ("batch status batch_nope", "No batch 'batch_nope' here."),
    ("batch frobnicate", "invalid choice: 'frobnicate'"),
])
def test_mistakes_get_one_line_that_says_what_to_do(shell, in_process, line, expected):
    shell.user_ns.update(empty=[], one={"model": "x"}, numbers=[1, 2], prompts=["a"],
                         frame=pd.DataFrame({"prompt": ["a", "b"]}))
    shown = magic(shell, line)
    assert expected in shown.stderr
    assert "Traceback" not in shown.stderr
    assert in_process.by_route["/v1/chat/completions"] == 0


def test_results_of_a_running_batch_say_to_wait(shell, held):
    shell.user_ns["prompts"] = ["a", "b"]
    magic(shell, "batch submit prompts")
    assert "`%first batch wait`" in magic(shell, "batch results").stderr  # its answers wait for the gate
    held.set()
    assert batch_client.wait(every=0.1)["status"] == "completed"


def test_help_lists_every_action_with_its_options(shell):
    text = magic(shell, "help batch").stdout
    for usage in ("%first batch submit", "--monitor", "%first batch results [--into VAR] [ID]", "%first batch list"):
        assert usage in text


def test_the_monitor_follows_a_batch_to_its_end(shell, in_process):
    in_process.first_byte_delay = 0.2
    shell.user_ns["prompts"] = [f"q{i}" for i in range(6)]
    magic(shell, "batch submit prompts")
    monitor = BatchMonitor(every=0.1)  # the batch submitted last
    assert monitor.wait(30)
    assert monitor.batch["status"] == "completed"
    assert (monitor.bar.value, monitor.bar.max, monitor.bar.bar_style) == (6, 6, "success")
    assert monitor.counts.value.startswith("6 of 6 done, ")
    assert "requests/s" in monitor.counts.value
    assert monitor.cancel_button.disabled
    assert monitor.error_line.value == ""


def test_the_monitors_cancel_button_stops_the_batch(shell, held):
    shell.user_ns["prompts"] = [f"q{i}" for i in range(200)]
    shown = magic(shell, "batch submit prompts --monitor")
    assert any("application/vnd.jupyter.widget-view+json" in o.data for o in shown.outputs)  # a monitor shown
    monitor = BatchMonitor(every=0.1)
    monitor.cancel_button.click()
    held.set()  # no request was answered before the cancel
    assert monitor.wait(30)
    assert monitor.batch["status"] == "cancelled"
    assert monitor.bar.bar_style == "warning"
    assert monitor.bar.value == monitor.bar.max == 200  # each request answered or reported as not run


def test_the_monitor_stops_with_the_gateway_it_began_on_and_starts_none(shell, held):
    shell.user_ns["prompts"] = [f"q{i}" for i in range(50)]
    magic(shell, "batch submit prompts")
    monitor = BatchMonitor(every=0.05)
    assert not monitor.wait(0)  # following: the batch cannot end while its answers wait for the gate
    client.disconnect()
    assert monitor.wait(30)
    assert "no longer uses the gateway it ran on" in monitor.error_line.value
    assert f"%first batch status {monitor.batch_id}" in monitor.error_line.value
    # its thread has ended, so no refresh of it is still going on: a gateway one had started would be running now
    assert not [t for t in threading.enumerate() if t.name == "first-gateway-in-process"]


def test_the_monitor_reports_an_unknown_batch_in_its_error_line(in_process):
    monitor = BatchMonitor("batch_missing")
    assert "No batch 'batch_missing' here." in monitor.error_line.value
    assert monitor.wait(0)


# -- the terminal -------------------------------------------------------------------------------------------------


@pytest.fixture
def running_server(in_process, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process gateway, found by ``first`` as a Jupyter server's terminal finds its server."""
    conn = client.connection()
    monkeypatch.setenv(client.GATEWAY_URL_ENV, conn.url)
    monkeypatch.setenv(client.API_KEY_ENV, conn.api_key)


def test_the_command_line_submits_waits_lists_and_writes_results(running_server, in_process, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    assert cli.main(["batch", "submit", str(prompts), "-m", "fake-model", "--wait"]) == 0
    out = capsys.readouterr().out
    batch_id = out.split()[1]
    assert f"{batch_id}: completed, 3 of 3 done" in out

    assert cli.main(["batch", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:3] == [batch_id, "completed", "3/3"]

    assert cli.main(["batch", "status", batch_id]) == 0
    assert capsys.readouterr().out.startswith(f"{batch_id}: completed")

    assert cli.main(["batch", "results", batch_id]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["answer"]) for r in rows] == [("one", ANSWER), ("two", ANSWER), ("three", ANSWER)]

    table = tmp_path / "answers.csv"
    assert cli.main(["batch", "results", batch_id, "-o", str(table)]) == 0
    with table.open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["prompt"] for r in written] == ["one", "two", "three"]
    assert written[0]["status_code"] == "200"


def test_the_command_line_exits_1_when_a_waited_batch_does_not_complete(running_server, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"model": "no-such-model", "messages": []}) + "\n")
    assert cli.main(["batch", "submit", str(bad), "--wait"]) == 1
    assert "failed, 0 of 1 done" in capsys.readouterr().out
    assert cli.main(["batch", "status", "batch_nope"]) == 2
    assert "No batch 'batch_nope' here." in capsys.readouterr().err
