"""Stream watching: usage found, model renamed, the usage-only event dropped when asked, whatever the spacing.

Events that need nothing must come out as the upstream's own bytes; those that need a rewrite are parsed, so
compact JSON (orjson, vLLM) and spaced JSON (Python's ``json.dumps``) are treated alike.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from first_jupyter.gateway import stream_watch
from first_jupyter.gateway.stream_watch import StreamWatch, rename_model_in_body
from first_jupyter.protocol import Capability, OpenAIError, parse_request


def _event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_usage_found_even_when_split_across_reads():
    watch = StreamWatch("m", rename=False, strip_usage_event=False)
    final = _event({"choices": [{"delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}})
    out = [watch.feed(_event({"choices": [{"delta": {"content": "a"}}]})), watch.feed(final[:30]),
           watch.feed(final[30:])]
    assert b"".join(out).endswith(final)
    assert (watch.prompt_tokens, watch.completion_tokens) == (7, 11)


def test_usage_with_nested_token_details_is_found():
    """OpenAI and newer vLLM put objects inside usage; tokens must still be counted."""
    watch = StreamWatch("m", rename=False, strip_usage_event=True)
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    content = _event({"choices": [{"delta": {"content": "x"}}]})
    out = watch.feed(content + _event({"choices": [], "usage": usage}) + b"data: [DONE]\n\n")
    assert (watch.prompt_tokens, watch.completion_tokens) == (9, 4)
    assert out == content + b"data: [DONE]\n\n"


def test_engine_model_name_is_replaced_by_the_public_id():
    watch = StreamWatch("tiny-chat", rename=True, strip_usage_event=False)
    chunks = [_event({"model": "/models/tiny@main", "choices": [{"delta": {"content": str(i)}}]}) for i in range(3)]
    out = b"".join(watch.feed(c) for c in chunks)
    assert out.count(b'"model":"tiny-chat"') == 3
    assert b"/models/tiny" not in out


def test_whole_answer_renamed_and_counted_without_touching_the_rest():
    answer = {"id": "x", "object": "chat.completion", "model": "/models/tiny@main",
              "choices": [{"message": {"role": "assistant", "content": 'say "model":"other" \u00e9'}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}}
    raw = orjson.dumps(answer)
    body, prompt, completion = rename_model_in_body(raw, "tiny-chat")
    assert orjson.loads(body) == {**answer, "model": "tiny-chat"}
    assert (prompt, completion) == (3, 5)
    assert rename_model_in_body(orjson.dumps({**answer, "model": "tiny-chat"}), "tiny-chat")[0] == orjson.dumps(
        {**answer, "model": "tiny-chat"})  # same name: the very bytes go on
    embeddings = orjson.dumps({"object": "list", "data": [{"embedding": [0.5] * 8, "index": 0}], "model": "e@main",
                               "usage": {"prompt_tokens": 2, "total_tokens": 2}})
    body, prompt, completion = rename_model_in_body(embeddings, "embed")
    assert orjson.loads(body)["model"] == "embed"
    assert (prompt, completion) == (2, None)
    assert rename_model_in_body(b"not json", "m") == (b"not json", None, None)


def test_usage_only_event_is_dropped_when_the_gateway_asked_for_it():
    watch = StreamWatch("m", rename=False, strip_usage_event=True)
    content = _event({"choices": [{"delta": {"content": "x"}}]})
    usage_only = _event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    out = watch.feed(content + usage_only + b"data: [DONE]\n\n")
    assert out == content + b"data: [DONE]\n\n"
    assert watch.completion_tokens == 1


def test_unknown_fields_pass_through_byte_for_byte():
    raw = b'{"model":"m","messages":[{"role":"user","content":"x","name":"ann"}],"top_k":5,"min_p":0.1}'
    req = parse_request(Capability.chat, raw)
    assert req.raw is raw
    assert req.data["top_k"] == 5
    assert req.stream is False


def test_error_event_shape():
    event = OpenAIError(502, "gone", type="api_error", code="upstream_disconnected").sse_event()
    assert orjson.loads(event.removeprefix(b"data: ")) == {
        "error": {"message": "gone", "type": "api_error", "param": None, "code": "upstream_disconnected"}}


ENGINE = "/models/tiny@main"
PUBLIC = "tiny-chat"
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
         "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _compact(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _spaced(obj: Any) -> bytes:
    """As Python's ``json.dumps`` writes it: ``"model": "x"``, ``"choices": []``."""
    return json.dumps(obj).encode()


def _odd(obj: Any) -> bytes:
    """Spacing no engine uses, around every colon and comma."""
    return json.dumps(obj, separators=(" , ", " :  ")).encode()


DUMPS = pytest.mark.parametrize("dump", [_compact, _spaced, _odd], ids=["compact", "spaced", "odd"])


def _events(model: str = ENGINE, *, usage: bool = True, content: str = "hi") -> list[dict[str, Any]]:
    """A chat stream as vLLM sends it with ``include_usage``: role, content, finish, then the usage-only event."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              *({**base, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in content),
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    return [*events, {**base, "choices": [], "usage": USAGE}] if usage else events


def _sse(events: list[dict[str, Any]], dump: Callable[[Any], bytes], sep: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + dump(e) + sep for e in events) + b"data: [DONE]" + sep


def _read(stream: bytes) -> list[Any]:
    """What a client gets from the relayed bytes: each event's data, parsed (``[DONE]`` as the string)."""
    events = [e for e in stream.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    payloads = []
    for event in events:
        lines = [line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")]
        if not lines:
            continue  # a comment
        data = b"\n".join(lines)
        payloads.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return payloads


def _relay(stream: bytes, *, cuts: tuple[int, ...] = (), rename: bool = True, strip: bool = True,
           public: str = PUBLIC) -> tuple[bytes, StreamWatch]:
    """Feed ``stream`` cut at ``cuts`` (sorted byte offsets) through a fresh watch; what it sent on, and the watch."""
    watch = StreamWatch(public, rename=rename, strip_usage_event=strip)
    bounds = [0, *cuts, len(stream)]
    return b"".join(watch.feed(stream[a:b]) for a, b in itertools.pairwise(bounds)), watch


@DUMPS
@pytest.mark.parametrize("strip", [True, False], ids=["usage-not-asked", "usage-asked"])
def test_renamed_and_usage_stripped_whatever_the_spacing(dump, strip):
    """The regression of issue 21: ``"model": "x"`` went un-renamed and ``"choices": []`` reached clients."""
    out, watch = _relay(_sse(_events(), dump), strip=strip)
    got = _read(out)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["model"] == PUBLIC for c in chunks)
    assert (watch.prompt_tokens, watch.completion_tokens) == (9, 3)
    if strip:  # the client did not ask for usage: every event it sees has a choice to read
        assert all(c["choices"] for c in chunks)
        assert len(chunks) == len(_events()) - 1
    else:  # it asked: the usage-only event is its last, renamed like the rest, usage intact
        assert chunks[-1] == {**_events()[-1], "model": PUBLIC}
        assert len(chunks) == len(_events())


@DUMPS
def test_events_that_need_nothing_keep_their_bytes(dump):
    """Same name at the engine, no usage event: the stream goes on byte for byte, whatever its spelling."""
    stream = _sse(_events(PUBLIC, usage=False), dump)
    out, watch = _relay(stream)
    assert out == stream
    assert (watch.prompt_tokens, watch.completion_tokens) == (None, None)
    cut = _sse(_events(PUBLIC), dump)  # with the usage event dropped, its neighbours still keep their bytes
    out, watch = _relay(cut)
    assert out == stream
    assert watch.prompt_tokens == 9


@DUMPS
def test_only_the_event_that_needs_it_is_rewritten(dump):
    """A rename rewrites the events that name the engine; a comment, ``[DONE]`` and other events stay as they came."""
    untouched = b": keep-alive\n\n" + b"data: " + dump({"object": "note", "text": "no model here"}) + b"\n\n"
    out, _ = _relay(untouched + _sse(_events(usage=False), dump))
    assert out.startswith(untouched)
    assert out.endswith(b"\n\ndata: [DONE]\n\n")
    assert [c["model"] for c in _read(out)[1:-1]] == [PUBLIC] * len(_events(usage=False))


@DUMPS
def test_events_cut_at_every_byte_are_treated_as_whole_ones(dump):
    stream = _sse(_events(content="ab"), dump)
    whole, _ = _relay(stream)
    assert [c["model"] for c in _read(whole)[:-1]] == [PUBLIC] * (len(_events(content="ab")) - 1)
    for cut in range(1, len(stream)):
        out, watch = _relay(stream, cuts=(cut,))
        assert out == whole, cut
        assert (watch.prompt_tokens, watch.completion_tokens) == (9, 3), cut
    out, watch = _relay(stream, cuts=tuple(range(1, len(stream))))  # one byte per chunk
    assert out == whole
    assert watch.completion_tokens == 3


@DUMPS
def test_crlf_separated_events(dump):
    stream = _sse(_events(), dump, sep=b"\r\n\r\n")
    out, watch = _relay(stream)
    assert b"\n\n" not in out.replace(b"\r\n\r\n", b"")  # every event still ends as the upstream ends them
    assert out.endswith(b"\r\n\r\ndata: [DONE]\r\n\r\n")
    got = _read(out)
    assert all(c["model"] == PUBLIC and c["choices"] for c in got[:-1])
    assert len(got) == len(_events())  # the usage-only event dropped, [DONE] kept
    assert watch.completion_tokens == 3
    for cut in range(1, len(stream)):
        assert _relay(stream, cuts=(cut,))[0] == out, cut
    plain = _sse(_events(PUBLIC, usage=False), dump, sep=b"\r\n\r\n")
    assert _relay(plain)[0] == plain


def test_rename_touches_only_the_top_level_model():
    """Content that quotes the engine's name, even as a ``"model"`` key, is the model's words: they stay."""
    said = f'I am {ENGINE}; {{"model": "{ENGINE}"}} and {{"model":"{ENGINE}"}}'
    events = _events(content="x")
    events[1]["choices"][0]["delta"]["content"] = said
    events[1]["choices"][0]["tool_hint"] = {"model": ENGINE}
    for dump in (_compact, _spaced):
        got = _read(_relay(_sse(events, dump))[0])
        assert got[1]["model"] == PUBLIC
        assert got[1]["choices"][0]["delta"]["content"] == said
        assert got[1]["choices"][0]["tool_hint"] == {"model": ENGINE}


def test_engine_name_written_with_escapes_is_still_renamed():
    """Some encoders write ``/`` as ``\\/`` or non-ASCII as ``\\u00e9``: the name is compared decoded."""
    event = b'data: {"id":"c","model":"\\/models\\/tiny@main","choices":[{"delta":{"content":"x"}}]}\n\n'
    out, _ = _relay(event * 3)
    assert [c["model"] for c in _read(out)] == [PUBLIC] * 3
    accented = b'data: {"model": "mod\\u00e8le", "choices": [{"delta": {"content": "x"}}]}\n\n'
    out, _ = _relay(accented * 2)
    assert [c["model"] for c in _read(out)] == [PUBLIC] * 2


def test_usage_only_event_is_told_by_its_empty_choices_not_by_bytes():
    """Only a usage-only event is dropped: an event with no choices and no usage (Azure's filter results) stays,
    and so does a last event that carries both a choice and usage."""
    filters = b'data: {"choices": [], "prompt_filter_results": [{"prompt_index": 0}]}\n\n'
    final = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, ' \
            b'"completion_tokens": 2}}\n\n'
    stream = filters + final + b"data: [DONE]\n\n"
    out, watch = _relay(stream, rename=False)
    assert out == stream
    assert (watch.prompt_tokens, watch.completion_tokens) == (1, 2)


def test_events_with_other_fields_keep_them_when_rewritten():
    stream = (b"event: chunk\nid: 7\ndata: " + _spaced(_events()[1]) + b"\n\n"
              b": note\ndata: " + _spaced(_events()[-1]) + b"\n\n")
    out, watch = _relay(stream)
    assert out.startswith(b"event: chunk\nid: 7\ndata: {")
    assert _read(out) == [{**_events()[1], "model": PUBLIC}]
    assert watch.completion_tokens == 3


def test_data_split_over_lines_is_parsed_as_one():
    event = b'data: {"model": "/models/tiny@main",\ndata:  "choices": [{"delta": {"content": "x"}}]}\n\n'
    out, _ = _relay(event)
    assert out == b'data: {"model":"tiny-chat","choices":[{"delta":{"content":"x"}}]}\n\n'


def test_cheap_path_parses_nothing_but_the_usage_event(monkeypatch):
    """With nothing to rename, only the event that carries a usage object is parsed; ``"usage": null``, which
    OpenAI writes in every event once usage is asked for, is not one."""
    parsed: list[bytes] = []
    real = orjson.loads

    def counting(data: bytes) -> Any:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(stream_watch, "orjson", type("Spy", (), {"loads": staticmethod(counting), "dumps": orjson.dumps,
                                                         "JSONDecodeError": orjson.JSONDecodeError}))
    events = [{**e, "usage": None} for e in _events(PUBLIC, usage=False, content="abcdefgh")]
    stream = _sse([*events, _events(PUBLIC)[-1]], _spaced)
    ends = [i + 2 for i in range(len(stream)) if stream.startswith(b"\n\n", i)]
    out, watch = _relay(stream, cuts=tuple(ends[:-1]))  # one event per chunk, as engines send them
    assert len(parsed) == 2  # the first event, to learn that the engine says the public name; the usage event
    assert b'"choices": []' in parsed[-1]
    assert watch.completion_tokens == 3
    assert out == _sse(events, _spaced)


def test_done_passes_at_once_and_untouched():
    """``[DONE]`` needs nothing: it goes on even when the upstream never ends it with a blank line."""
    watch = StreamWatch(PUBLIC, rename=True, strip_usage_event=True)
    assert watch.feed(b"data: [DONE]") == b"data: [DONE]"
    assert watch.feed(b"\n\n") == b"\n\n"
    assert watch.feed(b"data: ") == b""  # too soon to tell
    assert watch.feed(b"[DO") == b"data: [DO"  # no JSON object: nothing to rewrite
    assert watch.feed(b"NE]\n\ndata: {") == b"NE]\n\n"  # that one may need a rewrite: held until its end
    assert watch.feed(b'"choices": []}\n\n') == b'data: {"choices": []}\n\n'


def test_an_event_held_past_the_bound_goes_on_unwatched(monkeypatch):
    """Memory per stream is bounded: an event still unfinished past the bound is passed as it comes, and the
    events after it are watched again."""
    monkeypatch.setattr(stream_watch, "_MAX_EVENT", 64)
    big = b"data: " + _spaced({"model": ENGINE, "choices": [{"delta": {"content": "y" * 200}}]}) + b"\n\n"
    watch = StreamWatch(PUBLIC, rename=True, strip_usage_event=True)
    assert watch.feed(big[:100]) == big[:100]
    assert watch.feed(big[100:-1]) == big[100:-1]
    rest = _sse(_events(), _spaced)
    out = watch.feed(big[-1:] + rest)
    assert out.startswith(b"\n")
    got = _read(out[1:])
    assert [c["model"] for c in got[:-1]] == [PUBLIC] * (len(_events()) - 1)
    assert watch.completion_tokens == 3


@DUMPS
def test_a_last_event_without_its_blank_line_goes_on_when_the_stream_ends(dump):
    """An upstream that ends its last event with a single newline: held while more may come, sent (renamed) at the
    stream's clean end."""
    stream = _sse(_events(), dump).removesuffix(b"data: [DONE]\n\n").rstrip(b"\n") + b"\n"
    out, watch = _relay(stream, strip=False)
    out += watch.finish()
    got = _read(out + b"\n")
    assert all(c["model"] == PUBLIC for c in got)
    assert len(got) == len(_events())
    assert watch.finish() == b""
