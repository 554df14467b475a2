"""Each wire format's answers, in-process on the fake engine (testing/fake_engine.py): every
documented operation's response against the OpenAPI document, what the routes refuse, the error
each engine error becomes in each format, and the access and loading errors in each format's shape.

Milliseconds each: no process, no socket, no model. What runs through the model (sampling, stop
strings, cancellation, time limits, token counts) is tested on real workers in tests/test_api_*.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from testing.apps import make_fake_app
from testing.contract import CASES, HI, case_ids, check_response, request_schema
from testing.fake_engine import FAKE_REPLY, prompt_tokens
from testing.tiny_models import TINY_CHAT, TINY_EMBED, copy_tiny_models

KEY = "shape-key"


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return make_fake_app(tiny_model_dir, tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="module")
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def document(client: FlaskClient) -> dict[str, Any]:
    return client.get("/openapi.json").get_json()


# -- every documented operation answers as the document says


def test_the_contract_cases_cover_every_documented_operation(document: dict[str, Any]) -> None:
    covered = {(case["template"], case["method"]) for case in CASES if case["status"] < 300}
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert documented <= covered, f"no successful contract case for {sorted(documented - covered)}"


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_each_answer_matches_the_document(client: FlaskClient, document: dict[str, Any], case: dict[str, Any]) -> None:
    response = client.open(case["path"], method=case["method"].upper(), json=case["body"], headers=case["headers"])
    assert response.status_code == case["status"], response.text[:500]
    check_response(document, case, response)


# -- the reply itself, field by field, where the fake makes every value known


def rendered_prompt_tokens(*turns: tuple[str, str]) -> int:
    """The tokens of a ChatML prompt (the tiny model's template) on the fake: one per byte."""
    return prompt_tokens("".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
                         + "<|im_start|>assistant\n")


def test_an_openai_chat_completion_field_by_field(client: FlaskClient) -> None:
    body = client.post("/v1/chat/completions", json={"messages": HI}).get_json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-chat" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": FAKE_REPLY, "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    tokens = rendered_prompt_tokens(("user", "Hi"))
    assert body["usage"] == {"prompt_tokens": tokens, "completion_tokens": 6, "total_tokens": tokens + 6}


def test_an_anthropic_message_field_by_field(client: FlaskClient) -> None:
    body = client.post("/v1/messages", json={"messages": HI, "max_tokens": 2}).get_json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "tiny-chat"
    assert body["content"] == [{"type": "text", "text": "This is"}]
    assert body["stop_reason"] == "max_tokens" and body["stop_sequence"] is None
    assert body["usage"]["input_tokens"] == rendered_prompt_tokens(("user", "Hi"))
    assert body["usage"]["output_tokens"] == 2


def test_an_ollama_chat_stream_line_by_line(client: FlaskClient) -> None:
    response = client.post("/api/chat", json={"model": "tiny-chat", "messages": HI})
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == FAKE_REPLY
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 6
    assert lines[-1]["prompt_eval_count"] == rendered_prompt_tokens(("user", "Hi"))


# -- an engine error names the client's own field, in each format


TOO_LONG = "x" * 600  # the tiny chat model's window is 512 tokens; one token per byte on the fake
CONTEXT_CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, "messages"),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt"),
    ("/v1/responses", {"input": TOO_LONG}, "input"),
    ("/gpt4all_api", {"prompt": TOO_LONG}, "prompt"),
    ("/v0/language-models/generate", {"prompt": TOO_LONG}, "prompt"),
    ("/v0/language-models/chat-completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, "messages"),
    ("/generate", {"prompt": TOO_LONG}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), CONTEXT_CASES, ids=[path for path, _, _ in CONTEXT_CASES])
def test_a_prompt_too_long_is_a_400_naming_the_routes_own_field(client: FlaskClient, path: str, body: dict,
                                                                param: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "user", "content": TOO_LONG}]}),
    ("/api/generate", {"model": "tiny-chat", "prompt": TOO_LONG}),
])
def test_a_prompt_too_long_is_an_ollama_400(client: FlaskClient, path: str, body: dict) -> None:
    assert_ollama_error(client.post(path, json=body), 400, "context")


def test_a_prompt_too_long_is_an_anthropic_invalid_request_error(client: FlaskClient) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = client.post(path, json={"messages": [{"role": "user", "content": TOO_LONG}], "max_tokens": 5})
        assert response.status_code == 400, response.text
        body = response.get_json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


# -- access and loading errors in Ollama's shape


def assert_ollama_error(response: Any, status: int, mentions: str) -> None:
    """Ollama's error shape: {"error": "<message>"} and nothing else, with the status."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert mentions in body["error"], body


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FlaskClient:
    return make_fake_app(tiny_model_dir, tmp_path_factory.mktemp("keyed"), API_KEY=KEY).test_client()


def test_the_ollama_routes_need_the_key_but_the_health_routes_stay_open(keyed: FlaskClient) -> None:
    assert keyed.get("/").text == "Ollama is running"
    assert keyed.head("/").status_code == 200
    assert keyed.get("/api/version").status_code == 200
    for method, path in [("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"), ("POST", "/api/chat"),
                         ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/embeddings")]:
        assert_ollama_error(keyed.open(path, method=method, json={"model": "tiny-chat"}), 401, "API key")
    assert_ollama_error(keyed.get("/api/tags", headers={"Authorization": "Bearer nope"}), 401, "API key")
    assert keyed.get("/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_client_not_in_authorized_urls_is_a_403_in_ollama_shape(tiny_model_dir: Path, tmp_path: Path) -> None:
    refused = make_fake_app(tiny_model_dir, tmp_path, AUTHORIZED_URLS="10.1.2.3").test_client()
    assert_ollama_error(refused.get("/api/tags"), 403, "AUTHORIZED_URLS")
    assert_ollama_error(refused.post("/api/chat", json={"model": "tiny-chat", "messages": HI}), 403, "AUTHORIZED_URLS")


@pytest.fixture
def broken_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """The tiny models, with the chat model's file replaced by bytes that are no GGUF model, and no embedding model."""
    folder = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    (folder / TINY_CHAT).write_bytes(b"GGUF" + bytes(range(256)) * 40)
    (folder / TINY_EMBED).unlink()
    yield folder


def test_a_model_that_cannot_load_is_an_ollama_503_with_retry_after(broken_model_dir: Path, tmp_path: Path) -> None:
    broken = make_fake_app(broken_model_dir, tmp_path).test_client()
    for path, body in [("/api/chat", {"messages": HI}), ("/api/generate", {"prompt": "Hi"}),
                       ("/api/embed", {"input": "hi"}), ("/api/embeddings", {"prompt": "hi"})]:
        response = broken.post(path, json={"model": "tiny-chat", **body})
        assert_ollama_error(response, 503, "could not be loaded" if "embed" not in path else "no embedding model")
        assert int(response.headers["Retry-After"]) > 0


# -- what the routes refuse in a well-formed body, the document refuses too (and nothing more)
#
# Each probe is a base body that asks for as little work as possible, and values of one field, some
# that the route takes and some that it refuses with a 400 of its own (tools, images, a raw prompt
# with a system message, ...). A body is answered without a 400 exactly when the
# document admits it, and a 400 names the field.

PROBE_BASES: dict[str, dict[str, Any]] = {
    "/api/chat": {"model": "tiny-chat", "messages": [], "stream": False},  # no messages: the model is only checked
    "/api/generate": {"model": "tiny-chat", "prompt": "", "stream": False},
    "/api/embed": {"model": "tiny-embed"},
    "/v1/messages": {"messages": HI, "max_tokens": 1},
    "/v1/messages/count_tokens": {"messages": HI},
    "/v1/responses": {"input": "Hi", "max_output_tokens": 1},
}
UNSUPPORTED_PROBES: list[tuple[str, str, list[object]]] = [
    ("/api/chat", "tools", [[], [{}], [{"type": "function", "function": {"name": "f"}}]]),
    ("/api/chat", "format", ["", {}, "json", {"type": "object"}]),
    ("/api/chat", "think", [False, "", True, "high"]),
    ("/api/chat", "logprobs", [False, True]),
    ("/api/chat", "top_logprobs", [0, 0.0, 1]),
    ("/api/chat", "messages", [[{"role": "user", "content": "Hi", "images": [], "tool_calls": []}],
                               [{"role": "user", "content": "Hi", "images": ["aGk="]}],
                               [{"role": "assistant", "content": "", "tool_calls": [{}]}]]),
    ("/api/generate", "images", [[], ["aGk="]]),
    ("/api/generate", "suffix", ["", "return 1"]),
    ("/api/generate", "template", ["", "{{ .Prompt }}"]),
    ("/api/generate", "context", [[], [1, 2]]),
    ("/api/generate", "system", ["", "Be brief."]),  # with raw: true
    ("/api/embed", "input", ["", [], ["a"], ["a", ""]]),
    ("/v1/messages", "tools", [[], [{"name": "f", "input_schema": {}}]]),
    ("/v1/messages", "mcp_servers", [[], [{"type": "url", "url": "http://127.0.0.1:9", "name": "x"}]]),
    ("/v1/messages", "tool_choice", [{"type": "auto"}, {"type": "none"}, {}, {"type": "any"}, {"type": "tool", "name": "f"}]),
    ("/v1/messages", "thinking", [{"type": "disabled"}, {}, {"type": "enabled", "budget_tokens": 1024}]),
    ("/v1/messages", "output_config", [{}, {"format": None}, {"effort": "low"}, {"format": {"type": "json_schema"}}]),
    ("/v1/messages/count_tokens", "tools", [[], [{"name": "f", "input_schema": {}}]]),
    ("/v1/messages/count_tokens", "thinking", [{"type": "disabled"}, {"type": "enabled", "budget_tokens": 1024}]),
    ("/v1/responses", "store", [False, True]),
    ("/v1/responses", "previous_response_id", ["", "resp_1"]),
    ("/v1/responses", "conversation", ["", "conv_1", {}, {"id": "conv_1"}]),
    ("/v1/responses", "prompt", [{}, {"id": "pmpt_1"}]),
    ("/v1/responses", "background", [False, True]),
    ("/v1/responses", "tools", [[], [{"type": "function", "name": "f"}]]),
    ("/v1/responses", "tool_choice", ["none", "auto", "required", {}, {"type": "function", "name": "f"}]),
    ("/v1/responses", "text", [{}, {"format": None}, {"format": {}}, {"format": {"type": "text"}}, {"verbosity": "low"},
                               {"format": {"type": "json_object"}}, {"format": "text"}, {"format": {"name": "x"}}]),
    ("/v1/responses", "top_logprobs", [0, 1]),
]
PROBE_TOGETHER = {("/api/generate", "system"): {"raw": True}}


@pytest.mark.parametrize(("path", "field", "values"), UNSUPPORTED_PROBES, ids=[f"{p} {f}" for p, f, _ in UNSUPPORTED_PROBES])
def test_the_document_refuses_what_the_route_refuses(client: FlaskClient, document: dict[str, Any],
                                                     path: str, field: str, values: list[object]) -> None:
    schema = request_schema(document, path, "post")
    validator = Draft202012Validator({**(schema or {}), "components": document["components"]})
    for value in values:
        body = {**PROBE_BASES[path], **PROBE_TOGETHER.get((path, field), {}), field: value}
        response = client.post(path, json=body)
        refused = response.status_code == 400
        assert refused != validator.is_valid(body), (body, response.status_code, response.text[:300])
        if refused:
            named = response.get_json()["error"]
            named = named if isinstance(named, str) else named["message"]
            assert named.startswith(f"'{field}"), (body, named)
