"""The request models' errors, as clients read them: the client's field path and a plain sentence."""

from __future__ import annotations

import pytest

from api.errors import InvalidRequest
from api.wire import schemas
from api.wire.validation import field_path, parse

HI = [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(("model", "body", "param", "message"), [
    (schemas.OriginalRequest, {}, "prompt", "'prompt' is required"),
    (schemas.OriginalRequest, {"prompt": None}, "prompt", "'prompt' is required"),  # null counts as absent
    (schemas.OriginalRequest, {"prompt": " \n"}, "prompt", "'prompt' must not be empty"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": "hot"}, "temp", "'temp' must be a number"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": True}, "temp", "'temp' must be a number"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": float("inf")}, "temp", "'temp' must be a finite number"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": 9}, "temp", "'temp' must be between 0 and 2"),
    (schemas.OriginalRequest, {"prompt": "x", "max_tokens": 1.0}, "max_tokens", "'max_tokens' must be an integer"),
    (schemas.OriginalRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens", "'max_tokens' must be at least 1"),
    (schemas.ChatCompletionRequest, {"messages": HI, "top_p": 0}, "top_p", "'top_p' must be greater than 0 and at most 1"),
    (schemas.ChatCompletionRequest, {"messages": HI, "n": 9}, "n", "'n' must be between 1 and 8"),
    (schemas.ChatCompletionRequest, {"messages": ["hi"]}, "messages[0]", "'messages[0]' must be an object"),
    (schemas.ChatCompletionRequest, {"messages": [{"role": "x", "content": "a"}]}, "messages[0].role",
     "'messages[0].role' must be 'system', 'developer', 'user' or 'assistant'"),
    (schemas.ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "'messages[0].content' must be a string or an array of text parts"),
    (schemas.ChatCompletionRequest, {"messages": HI, "stop": ["a", 1]}, "stop", "'stop' must be a string or a list of at most 16"),
    (schemas.ChatCompletionRequest, {"messages": HI, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "'stream_options.include_usage' must be a boolean"),
    (schemas.EmbeddingRequest, {"input": "a", "encoding_format": "hex"}, "encoding_format",
     "'encoding_format' must be 'float' or 'base64'"),
    (schemas.LlmGenerateRequest, {"prompt": "x", "params": {"temp": -1}}, "params.temp", "'params.temp' must be between 0 and 2"),
])
def test_errors_name_the_field_and_say_what_is_expected(model: type, body: dict, param: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(model, body)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(message), caught.value.message


def test_valid_bodies_keep_their_values_and_defaults() -> None:
    body = parse(schemas.CompletionRequest, {"prompt": "x", "temperature": 1, "stop": None, "unknown": {"a": 1}})
    assert body.temperature == 1.0 and isinstance(body.temperature, float)
    assert body.stop is None and body.top_k == 40 and body.n == 1


def test_field_paths() -> None:
    assert field_path(("messages", 0, "role")) == "messages[0].role"
    assert field_path(("params", "temp")) == "params.temp"
    assert field_path(()) == ""
