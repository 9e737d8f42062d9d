"""Stream watching at the byte level: usage found, model renamed, the usage-only event dropped when asked."""

from __future__ import annotations

import orjson

from first_jupyter.gateway.relay import StreamWatch, rename_model_in_body
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
