"""The request models' errors, as clients read them: the client's field path and a plain sentence."""

from __future__ import annotations

from collections.abc import Callable

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.errors import InvalidRequest
from api.model_names import REQUESTED_MODEL_FILE_SCHEMA, ModelNameError, file_name_for
from api.wire import schemas
from api.wire.openai_chat import _repeat_penalty as repeat_penalty
from api.wire.openai_chat import apply_prompt_template
from api.wire.validation import NON_BLANK_PATTERN, WHITESPACE, field_path, parse

HI = [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(("model", "body", "param", "message"), [
    (schemas.OriginalRequest, {}, "prompt", "'prompt' is required"),
    (schemas.OriginalRequest, {"prompt": None}, "prompt", "'prompt' is required"),  # null counts as absent
    (schemas.OriginalRequest, {"prompt": " \n"}, "prompt", "'prompt' must not be empty"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": "hot"}, "temp", "'temp' must be a number"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": True}, "temp", "'temp' must be a number"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": float("inf")}, "temp", "'temp' must be a finite number"),
    (schemas.OriginalRequest, {"prompt": "x", "temp": 9}, "temp", "'temp' must be between 0 and 2"),
    (schemas.OriginalRequest, {"prompt": "x", "max_tokens": 1.5}, "max_tokens", "'max_tokens' must be an integer"),
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


# -- the document's patterns say exactly what the code checks
#
# JSON Schema patterns are ECMA 262 regular expressions. jsonschema_rs (schemathesis's validator) reads
# them as ECMA does; Python's re would let `$` match before a final newline, so it is not the judge here.

PROPERTY_RUNS = settings(max_examples=400, derandomize=True, database=None, deadline=None)


def matches(schema: dict, text: str) -> bool:
    return jsonschema_rs.validator_for({"type": "string", **schema}).is_valid(text)


def raises(check: Callable[[], object]) -> bool:
    try:
        check()
    except (InvalidRequest, ModelNameError):
        return True
    return False


@PROPERTY_RUNS
@given(st.text(alphabet=st.sampled_from(f"a%.{WHITESPACE}\ufeff\u200b"), max_size=6))
def test_the_non_blank_pattern_is_the_blank_check(text: str) -> None:
    assert matches({"pattern": NON_BLANK_PATTERN}, text) == bool(text.strip())
    assert raises(lambda: parse(schemas.OriginalRequest, {"prompt": text})) == (not text.strip())


@PROPERTY_RUNS
@given(st.text(alphabet=st.sampled_from("%12a \n\t\x1c\u3000"), max_size=10))
def test_the_prompt_template_pattern_is_the_template_check(template: str) -> None:
    assert matches({"pattern": schemas.PROMPT_TEMPLATE_PATTERN}, template) == (
        not raises(lambda: apply_prompt_template(template, "prompt")))


@PROPERTY_RUNS
@given(st.one_of(st.text(alphabet=st.sampled_from("aZ9._+-/\\ gGuUfF"), max_size=12),
                 st.builds(lambda stem, size, suffix: stem * size + suffix, st.sampled_from(["a", "a."]),
                           st.integers(190, 205), st.sampled_from(["", ".gguf", ".GGUF", "."]))))
def test_the_model_name_schema_is_the_model_name_check(name: str) -> None:
    assert matches(REQUESTED_MODEL_FILE_SCHEMA, name) == (not raises(lambda: file_name_for(name)))


def test_a_number_without_a_fraction_is_an_integer() -> None:
    """As in JSON Schema: 2.0 is the integer 2; 2.5 is not an integer."""
    body = parse(schemas.CompletionRequest, {"prompt": "x", "n": 2.0, "max_tokens": 1e2, "temperature": 1})
    assert body.n == 2 and isinstance(body.n, int) and body.max_tokens == 100
    assert body.temperature == 1.0 and isinstance(body.temperature, float)
    with pytest.raises(InvalidRequest, match="'n' must be an integer"):
        parse(schemas.CompletionRequest, {"prompt": "x", "n": 2.5})


def test_every_optional_field_is_documented_as_nullable() -> None:
    """A null counts as an absent field, so the document admits null wherever a field may be left out."""
    checked = 0
    for model in (schemas.OriginalRequest, schemas.ChatCompletionRequest, schemas.CompletionRequest,
                  schemas.EmbeddingRequest, schemas.V0ChatRequest, schemas.V0GenerateRequest, schemas.V0RetrieveRequest,
                  schemas.LlmGenerateRequest, schemas.LlmEmbeddingsRequest):
        document = model.model_json_schema()
        for name, field_schema in document["properties"].items():
            validator = jsonschema_rs.validator_for({**field_schema, "$defs": document.get("$defs", {})})
            assert validator.is_valid(None) == (name not in document.get("required", [])), (model.__name__, name)
            checked += 1
    assert checked > 80


@pytest.mark.parametrize(("body", "accepted"), [
    ({"repeat_penality": 1.1, "presence_penalty": None}, True),  # null is absent: presence_penalty is its default 0
    ({"repeat_penalty": 1.1, "presence_penalty": None}, True),
    ({"repeat_penalty": 1.1, "presence_penalty": 0}, True),
    ({"repeat_penality": 1.1, "presence_penalty": 0.5}, False),
    ({"repeat_penalty": 1.1, "presence_penalty": 0.5}, False),
    ({"repeat_penalty": 1.1, "repeat_penality": None}, True),
    ({"repeat_penalty": 1.1, "repeat_penality": 1.1}, False),
])
def test_the_document_says_which_penalties_go_together(body: dict, accepted: bool) -> None:
    """The document's cross-field rules read a null as the route does: as a field left out."""
    document = schemas.CompletionRequest.model_json_schema()
    body = {"prompt": "x", **body}
    assert jsonschema_rs.validator_for(document).is_valid(body) == accepted
    assert raises(lambda: repeat_penalty(parse(schemas.CompletionRequest, body))) != accepted
