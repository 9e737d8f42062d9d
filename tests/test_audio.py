"""Audio routes (``/first/v1/audio/transcriptions`` and ``/translations``) through every door, with the official
``openai`` client, against the fake upstream serving them as vLLM does: the form reaches the engine intact (its
file's hash), with the engine's name for the model, however large, without the gateway holding it in memory.

The embedded default (``transformers serve``) is not used here: its transcription route needs ``python-multipart``
and ``librosa``, which this environment lacks, and a Whisper model; the http backend (which the local backend
drives once its engine is up) is proven against the fake instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from bench.fake_upstream import serving_in_thread
from first_jupyter.api import door_kit
from first_jupyter.config import load_config
from first_jupyter.gateway.answers import Completed
from first_jupyter.gateway.audio import FORM_OVERHEAD, AudioForm
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.service import build_gateway
from tests.conftest import Door, fake_cluster_config, server_config

MAX_AUDIO = 60 * 1024 * 1024
UPSTREAM_NAME = "openai/whisper-tiny"
AUDIO = bytes(range(256)) * 4096 + b"\r\n--not-a-boundary\r\n"
"""A megabyte of every byte value, and what looks like a boundary without being the form's."""
BIG = 50 * 1024 * 1024


WHISPER = {"id": "whisper", "upstream_name": UPSTREAM_NAME, "capabilities": ["transcriptions", "translations"]}


def _config(upstream: Any) -> dict[str, Any]:
    config = fake_cluster_config(upstream, limits={"max_audio_bytes": MAX_AUDIO})
    config["clusters"]["remote"]["endpoints"][0]["models"].append(WHISPER)
    return config


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(_config(fake_upstream)), tmp_path / "data")


def _client(door: Door) -> openai.OpenAI:
    return openai.OpenAI(base_url=door.url, api_key=door.api_key, max_retries=0)


def _transcript(data: bytes) -> str:
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"


async def test_a_transcription_reaches_the_engine_intact_through_each_door(first_ext, door, fake_upstream):
    client = _client(door)
    done = await asyncio.to_thread(client.audio.transcriptions.create, model="whisper",
                                   file=("talk.wav", AUDIO, "audio/wav"), language="en", prompt="A talk.",
                                   timestamp_granularities=["word", "segment"], response_format="verbose_json")
    assert done.text == _transcript(AUDIO)
    seen = fake_upstream.last_request_body
    assert seen["fields"] == {"model": UPSTREAM_NAME, "language": "en", "prompt": "A talk.",
                              "response_format": "verbose_json", "timestamp_granularities[]": "segment"}
    assert (seen["file_name"], seen["file_type"], seen["file_bytes"]) == ("talk.wav", "audio/wav", len(AUDIO))
    headers = fake_upstream.last_request_headers
    assert int(headers["content-length"]) == seen["bytes"]
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    assert "transfer-encoding" not in headers


async def test_a_translation_through_each_key_door(first_ext, key_door, fake_upstream):
    client = openai.AsyncOpenAI(base_url=key_door.url, api_key=key_door.api_key, max_retries=0)
    done = await client.audio.translations.create(model="whisper", file=("talk.mp3", AUDIO, "audio/mpeg"))
    assert done.text == _transcript(AUDIO)
    assert fake_upstream.by_route["/v1/audio/translations"] == 1
    assert fake_upstream.last_request_body["fields"] == {"model": UPSTREAM_NAME}


@pytest.mark.parametrize(("response_format", "content_type", "first_line"),
                         [("text", "text/plain; charset=utf-8", None), ("srt", "application/x-subrip", "1"),
                          ("vtt", "text/vtt; charset=utf-8", "WEBVTT")])
async def test_text_and_subtitles_pass_through_with_their_content_type(first_ext, key_door, response_format,
                                                                       content_type, first_line):
    client = _client(key_door)
    raw = await asyncio.to_thread(client.audio.transcriptions.with_raw_response.create, model="whisper",
                                  file=("talk.wav", AUDIO), response_format=response_format)
    assert raw.headers["content-type"] == content_type
    text = raw.text
    assert _transcript(AUDIO) in text
    assert text.splitlines()[0] == (first_line or _transcript(AUDIO))


async def test_a_streamed_transcription_passes_through(first_ext, door):
    def run() -> list[Any]:
        return list(_client(door).audio.transcriptions.create(model="whisper", file=("talk.wav", AUDIO),
                                                               stream=True))

    events = await asyncio.to_thread(run)
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert " ".join(e.delta for e in events[:-1]) == events[-1].text == _transcript(AUDIO)


def _form(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    boundary = "b0undary"
    body = b"".join(b'--%b\r\nContent-Disposition: form-data; name="%b"%b\r\n\r\n%b\r\n' % (
        boundary.encode(), name.encode(), b'; filename="%b"' % filename.encode() if filename else b"", value)
        for name, value, filename in parts) + b"--%b--\r\n" % boundary.encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def test_the_model_may_come_after_the_file_as_curl_sends_it(first_ext, door, fake_upstream):
    body, content_type = _form(("file", AUDIO, "talk.flac"), ("model", b"whisper", None),
                               ("temperature", b"0.2", None))
    async with httpx.AsyncClient(headers=door.headers) as http:
        reply = await http.post(str(door.route("audio/transcriptions")), content=body,
                                headers={"Content-Type": content_type})
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == _transcript(AUDIO)
    assert fake_upstream.last_request_body["fields"] == {"model": UPSTREAM_NAME, "temperature": "0.2"}


async def test_a_form_without_a_model_is_a_400_naming_it(first_ext, door, fake_upstream):
    body, content_type = _form(("file", AUDIO, "talk.wav"))
    async with httpx.AsyncClient(headers=door.headers) as http:
        reply = await http.post(str(door.route("audio/transcriptions")), content=body,
                                headers={"Content-Type": content_type})
        not_a_form = await http.post(str(door.route("audio/translations")), json={"model": "whisper"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "model"
    assert "'model' field" in reply.json()["error"]["message"]
    assert not_a_form.status_code == 400
    assert "not a form" in not_a_form.json()["error"]["message"]
    assert fake_upstream.by_route["/v1/audio/transcriptions"] == 0


async def test_a_chat_model_cannot_transcribe(first_ext, key_door):
    with pytest.raises(openai.NotFoundError, match="cannot serve audio/transcriptions"):
        await asyncio.to_thread(_client(key_door).audio.transcriptions.create, model="fake-model",
                                file=("talk.wav", AUDIO))


def _refused_from_its_head(door: Door, size: int) -> bytes:
    """The answer to a form announcing ``size`` bytes, of which none is sent."""
    url = httpx.URL(str(door.route("audio/transcriptions")))
    auth = "".join(f"{name}: {value}\r\n" for name, value in door.headers.items())
    with socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n{auth}"
                     f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {size}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


async def test_a_form_over_the_limit_is_a_413_from_its_head(first_ext, door, fake_upstream):
    answer = await asyncio.to_thread(_refused_from_its_head, door, MAX_AUDIO + FORM_OVERHEAD + 1)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"max_audio_bytes" in answer
    assert fake_upstream.by_route["/v1/audio/transcriptions"] == 0


def test_a_file_over_the_limit_is_refused_at_the_byte_that_crosses_it(tmp_path):
    body, content_type = _form(("model", b"whisper", None), ("file", b"x" * 1001, "talk.wav"))
    form = AudioForm(content_type, tmp_path, 1000)
    form.feed(body)
    assert form.error is not None
    assert form.error.status == 413
    with pytest.raises(OpenAIError, match="over 1,000 bytes"):
        form.finish()
    assert list(tmp_path.iterdir()) == []  # the spool is unnamed: nothing is left behind


async def _chunks(size: int, digest: Any) -> AsyncIterator[bytes]:
    """A form whose file is ``size`` bytes, made as it is sent (chunked: no length announced)."""
    body, _ = _form(("model", b"whisper", None))
    yield body[: -len(b"--b0undary--\r\n")]
    yield b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n\r\n'
    piece = bytes(range(256)) * 1024
    for _ in range(size // len(piece)):
        digest.update(piece)
        yield piece
    yield b"\r\n--b0undary--\r\n"


async def test_a_large_upload_is_never_held_in_memory(first_ext, key_door, fake_upstream):
    """50 MB through a door, the gateway and the upstream client: what Python holds at its peak (every thread:
    the doors, the gateway's loop, the fake engine) stays a small fraction of it."""
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        async with httpx.AsyncClient(headers=key_door.headers, timeout=120) as http:
            reply = await http.post(str(key_door.route("audio/transcriptions")), content=_chunks(BIG, digest),
                                    headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == f"{BIG} bytes, sha256 {digest.hexdigest()}"
    assert peak - before < BIG // 10, f"{peak - before:,} bytes held at the peak for a {BIG:,}-byte upload"


async def test_a_failover_sends_the_form_again_from_its_spool(fake_upstream, write_config, tmp_path):
    """The first endpoint reads the whole form and fails (500): the next is sent the same bytes, from disk."""
    data = tmp_path / "data"
    body, content_type = _form(("model", b"whisper", None), ("file", AUDIO, "talk.wav"))
    with serving_in_thread(fault="500") as broken:
        config = {"clusters": {"remote": {"backend": "http", "endpoints": [
            {"name": "broken", "base_url": f"{broken.url}/v1", "models": [WHISPER]},
            {"name": "fake", "base_url": f"{fake_upstream.url}/v1", "models": [WHISPER]}]}}}
        gateway = build_gateway(load_config(write_config(config), data), data)
        form = AudioForm(content_type, data / "audio", MAX_AUDIO)
        form.feed(body)
        try:
            answer = await door_kit.start_form(gateway, Capability.transcriptions, form)
        finally:
            await gateway.close()
        tried = broken.last_request_body
    assert isinstance(answer, Completed)
    assert answer.target.endpoint == "fake"
    assert orjson.loads(answer.body)["text"] == _transcript(AUDIO)
    assert tried == fake_upstream.last_request_body
    assert tried["file_sha256"] == hashlib.sha256(AUDIO).hexdigest()
