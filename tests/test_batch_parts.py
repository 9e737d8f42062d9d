"""The batch pieces on their own: the streamed form parser, and the result files that are a run's record."""

from __future__ import annotations

import json
import random

import pytest

from first_jupyter.batch.results import Results
from first_jupyter.batch.upload import Upload
from first_jupyter.batch.validate import check_file
from first_jupyter.protocol import MAX_NESTING, OpenAIError

CONTENT = b'{"a": 1}\r\n{"b": "--boundar"}\n' + bytes(range(256)) + b"\n\r\n--not-it\n"
"""A file with CRLFs, bytes of every value and near-misses of the boundary, which must come through untouched."""


def _form(content: bytes, purpose: str = "batch", boundary: str = "boundary42") -> bytes:
    return (f"preamble\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"dir/in.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()


def _upload(tmp_path, content_type: str = "multipart/form-data; boundary=boundary42", **limits: int) -> Upload:
    return Upload(content_type, tmp_path / "spool", limits.get("max_bytes", 10_000), limits.get("max_lines", 100))


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
def test_a_form_fed_in_any_pieces_gives_the_file_exactly(tmp_path, split):
    body = _form(CONTENT)
    upload = _upload(tmp_path)
    if split == "whole":
        upload.feed(body)
    elif split == "bytes":
        for i in range(len(body)):
            upload.feed(body[i:i + 1])
    else:
        rng, at = random.Random(4), 0
        while at < len(body):
            step = rng.randint(1, 40)
            upload.feed(body[at:at + step])
            at += step
    assert upload.finish() == ("batch", "in.jsonl")  # the name only, no directories
    assert (tmp_path / "spool").read_bytes() == CONTENT
    assert (upload.bytes, upload.lines) == (len(CONTENT), CONTENT.count(b"\n"))


@pytest.mark.parametrize(("body", "content_type", "words"), [
    (_form(CONTENT)[:-20], None, "ended before its closing boundary"),
    (_form(CONTENT, purpose="fine-tune"), None, "purpose 'fine-tune' is not served here"),
    (b"--boundary42\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--boundary42--\r\n", None,
     "no 'file' part"),
    (b"{}", "application/json", "not a form"),
])
def test_a_bad_form_is_refused_saying_how_to_send_it_and_leaves_no_file(tmp_path, body, content_type, words):
    upload = _upload(tmp_path, content_type) if content_type else _upload(tmp_path)
    upload.feed(body)
    with pytest.raises(OpenAIError) as info:
        upload.finish()
    assert info.value.status == 400
    assert words in info.value.message
    assert not (tmp_path / "spool").exists()


def test_limits_are_checked_as_the_file_arrives(tmp_path):
    lines = b"".join(b"%d\n" % i for i in range(20))
    upload = _upload(tmp_path, max_lines=10)
    upload.feed(_form(lines))
    with pytest.raises(OpenAIError) as info:
        upload.finish()
    assert (info.value.status, info.value.code) == (413, "file_too_large")
    assert "more than 10 lines" in info.value.message
    assert not (tmp_path / "spool").exists()
    upload = _upload(tmp_path, max_lines=3)
    upload.feed(_form(b"1\n2\n3\n4"))  # the last line has no newline: still a line
    with pytest.raises(OpenAIError):
        upload.finish()
    upload = _upload(tmp_path, max_bytes=100)
    upload.feed(_form(b"x" * 101))
    with pytest.raises(OpenAIError) as info:
        upload.finish()
    assert "over 100 bytes" in info.value.message


def test_the_result_files_say_what_is_done_after_a_torn_write(tmp_path):
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    results = Results(output, errors)
    assert results.open() == set()
    results.answered("a", b'{"choices": [\n]}')  # an engine's body with a newline still makes one line
    results.refused("b", 400, {"error": {"message": "bad"}})
    results.not_run("c", "batch_cancelled", "cancelled")
    results.close(sync=True)
    with output.open("ab") as f:
        f.write(b'{"id": "batch_req_x", "custom_id": "d", "resp')  # a crash mid-write
    again = Results(output, errors)
    assert again.open() == {hash("a"), hash("b"), hash("c")}
    assert (again.completed, again.failed) == (1, 2)
    again.answered("d", b"{}")
    again.close(sync=False)
    answered = [json.loads(line) for line in output.read_bytes().splitlines()]
    assert [r["custom_id"] for r in answered] == ["a", "d"]
    assert answered[0]["response"]["body"] == {"choices": []}
    refused = [json.loads(line) for line in errors.read_bytes().splitlines()]
    assert refused[0]["response"]["status_code"] == 400
    assert refused[1] == {"id": refused[1]["id"], "custom_id": "c", "response": None,
                          "error": {"code": "batch_cancelled", "message": "cancelled"}}


def test_a_batch_checks_what_the_gateway_reads_line_by_line_and_leaves_the_rest_to_the_engine(tmp_path):
    def line(custom_id: str, **body: object) -> str:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}})

    deep = "[" * 300 + "]" * 300  # deeper than the gateway can write again
    lines = [line("ok", temperature=2.5, max_tokens=0, stream=None, prompt_embeds="AAAA"),
             line("parts", messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v"}}]}]),
             line("deep").replace('"hi"', deep), line("false", stream="false"),
             json.dumps({"custom_id": "x", "method": "POST", "url": "/" * 1_000_000, "body": {}})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    checked = check_file(path, "/v1/chat/completions", {"m"})
    assert checked.total == 5
    assert [(e.line, e.code, e.param) for e in checked.errors] == [
        (3, "invalid_request", "body"), (4, "invalid_request", "body.stream"), (5, "mismatched_url", "url")]
    assert str(MAX_NESTING) in checked.errors[0].message
    assert len(checked.errors[2].message) < 200  # a huge value is shown cut short
    assert checked.models == {"m": 2}
