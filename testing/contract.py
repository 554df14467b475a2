"""The OpenAPI contract cases: one request per documented operation and outcome, and the check that
an answer (from a real worker over HTTP, or from the app in-process) is what the document states.

tests/wire/test_wire_shapes.py runs every case in-process on the fake engine; tests/wire/test_openapi.py runs
the cases marked `real` (streams through waitress, limits the model file sets) on a real worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from jsonschema import Draft202012Validator


class Answer(Protocol):
    """What both requests' and Flask's test client's responses have."""

    status_code: int

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def text(self) -> str: ...


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def request_schema(document: dict[str, Any], path: str, method: str) -> dict[str, Any] | None:
    body = document["paths"][path][method].get("requestBody")
    return resolve(document, body["content"]["application/json"]["schema"]) if body else None


def _case(method: str, path: str, body: object = None, status: int = 200, template: str | None = None,
          headers: dict[str, str] | None = None, real: bool = False) -> dict[str, Any]:
    return {"method": method, "path": path, "body": body, "status": status, "template": template or path,
            "headers": headers or {}, "real": real}


HI = [{"role": "user", "content": "Hi"}]
CASES = [
    _case("get", "/health"),
    _case("get", "/ready"),
    _case("get", "/metrics"),
    _case("post", "/gpt4all_api", {"prompt": "Hi", "max_tokens": 3}, real=True),
    _case("post", "/gpt4all_api", {"prompt": "Hi", "max_tokens": 3}, headers={"Accept": "application/json"}),
    _case("post", "/gpt4all_api", {"prompt": 5}, 400),
    _case("post", "/v1/chat/completions", {"messages": HI, "max_tokens": 3, "n": 2}),
    _case("post", "/v1/chat/completions/", {"messages": HI, "max_tokens": 3}),
    _case("post", "/v1/chat/completions", {"messages": HI, "max_tokens": 3, "stream": True,
                                            "stream_options": {"include_usage": True}}, real=True),
    _case("post", "/v1/chat/completions", {"messages": HI, "model": "gpt-4"}, 404),
    _case("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}, 400, real=True),
    _case("post", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "echo": True}),
    _case("post", "/v1/completions/", {"prompt": "Hi", "max_tokens": 3, "prompt_template": "Q: %1\nA:"}),
    _case("post", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True}, real=True),
    _case("post", "/v1/completions", {"prompt": "Hi", "prompt_template": "none"}, 400),
    _case("post", "/v1/completions", {"prompt": ["Hi", "w"], "n": 2, "max_tokens": 3}),
    _case("post", "/v1/completions", {"prompt": ["Hi", "w"], "max_tokens": 3, "stream": True,
                                       "stream_options": {"include_usage": True}}),
    _case("post", "/v1/completions", {"prompt": ["w"] * 5, "n": 7}, 400),
    _case("post", "/v1/embeddings", {"input": ["a", "b"]}, real=True),
    _case("post", "/v1/embeddings/", {"input": "a", "encoding_format": "base64"}),
    _case("post", "/v1/embeddings", {"input": "a", "model": "ada"}, 404),
    _case("get", "/v1/models"),
    _case("get", "/v1/models/tiny-chat", template="/v1/models/{model}"),
    _case("get", "/v1/models/nope", status=404, template="/v1/models/{model}"),
    _case("get", "/v1/engines"),
    _case("get", "/v1/engines/"),
    _case("get", "/v1/engines/tiny-embed", template="/v1/engines/{engine_id}"),
    _case("get", "/v1/engines/nope", status=404, template="/v1/engines/{engine_id}"),
    _case("get", "/v1/health"),
    _case("get", "/v1/health/"),
    _case("post", "/v0/language-models/chat-completions", {"messages": HI, "max_tokens": 3}),
    _case("post", "/v0/language-models/generate", {"prompt": "Hi", "max_tokens": 3}),
    _case("post", "/v0/language-models/generate", {"prompt": "Hi", "model": "nope"}, 404),
    _case("post", "/v0/language-models/retrieve", {"model_name": "tiny-chat"}),
    _case("post", "/v0/language-models/retrieve", {"model_name": "nope"}, 403),
    _case("post", "/v0/language-models/retrieve", {"model_name": "tiny-chat", "model_path": "/etc"}, 403),
    _case("post", "/v0/language-models/retrieve", {"model_name": "../x.gguf"}, 400),
    _case("get", "/v0/models"),
    _case("post", "/generate", {"prompt": "Hi", "params": {"n_predict": 3}}),
    _case("post", "/agenerate", {"prompt": "Hi", "params": {"n_predict": 3}}, real=True),
    _case("post", "/agenerate", {"prompt": "Hi", "params": {"temp": -1}}, 400),
    _case("post", "/embeddings", {"text": "Hi"}),
    _case("get", "/check"),
    _case("post", "/v1/responses", {"input": "Hi", "max_output_tokens": 3}),
    _case("post", "/v1/responses", {"input": [{"role": "user", "content": "Hi"}], "stream": True}),
    _case("post", "/v1/responses", {"input": "Hi", "max_output_tokens": 3, "stream": True}, real=True),
    _case("post", "/v1/responses", {"input": "Hi", "store": True}, 400),
    _case("post", "/v1/responses", {"input": "Hi", "model": "gpt-5"}, 404),
    _case("post", "/v1/messages", {"messages": HI, "max_tokens": 30, "stop_sequences": ["k"]}),
    _case("post", "/v1/messages", {"messages": HI, "max_tokens": 3, "stream": True}, real=True),
    _case("post", "/v1/messages", {"messages": HI}, 400),
    _case("post", "/v1/messages", {"messages": HI, "max_tokens": 3, "model": "claude"}, 404),
    _case("post", "/v1/messages/count_tokens", {"messages": HI, "system": "Be brief."}),
    _case("post", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "x" * 600}]}, 400),
    _case("get", "/"),
    _case("get", "/api/version"),
    _case("get", "/api/tags"),
    _case("get", "/api/ps"),
    _case("post", "/api/show", {"model": "tiny-chat", "verbose": True}),
    _case("post", "/api/show", {"model": "nope"}, 404),
    _case("post", "/api/chat", {"model": "tiny-chat", "messages": HI, "options": {"num_predict": 3}}, real=True),
    _case("post", "/api/chat", {"model": "tiny-chat", "messages": HI, "stream": False}),
    _case("post", "/api/chat", {"model": "tiny-chat", "messages": []}),
    _case("post", "/api/chat", {"model": "tiny-chat", "messages": HI, "format": "json"}, 400),
    _case("post", "/api/chat", {"model": "nope", "messages": HI}, 404),
    _case("post", "/api/chat", {"model": "tiny-embed", "messages": HI}, 400),
    _case("post", "/api/generate", {"model": "tiny-chat", "prompt": "Hi", "options": {"num_predict": 3}}),
    _case("post", "/api/generate", {"model": "tiny-chat", "prompt": "Hi", "raw": True, "stream": False}),
    _case("post", "/api/generate", {"model": "tiny-chat", "prompt": "x" * 600, "raw": True}, 400, real=True),
    _case("post", "/api/embed", {"model": "tiny-embed", "input": ["a", "b"]}, real=True),
    _case("post", "/api/embed", {"model": "tiny-chat", "input": "a"}, 400),
    _case("post", "/api/embed", {"model": "tiny-embed", "input": ["a", ""]}, 400),
    _case("post", "/api/embeddings", {"model": "tiny-embed", "prompt": "a"}),
    _case("get", "/openapi.json"),
    _case("get", "/docs"),
    _case("get", "/docs/"),
    _case("get", "/docs/static/swagger-ui.css", template="/docs/static/{filename}"),
    _case("get", "/docs/static/nope.js", status=404, template="/docs/static/{filename}"),
]


def validate_json(document: dict[str, Any], schema: dict[str, Any], instance: object, where: str) -> None:
    errors = list(Draft202012Validator({**schema, "components": document["components"]}).iter_errors(instance))
    assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"


def check_response(document: dict[str, Any], case: dict[str, Any], response: Answer) -> None:
    """The status, media type and body (each event of a stream) of `response` are the ones the
    document states for the case's operation."""
    where = f"{case['method'].upper()} {case['path']} -> {response.status_code}"
    responses = document["paths"][case["template"]][case["method"]]["responses"]
    assert str(response.status_code) in responses, f"{where}: status not documented"
    content = responses[str(response.status_code)].get("content", {})
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    media = content.get(media_type) or content.get("*/*")
    assert media is not None, f"{where}: {media_type} not documented (only {list(content)})"
    if media_type == "application/json":
        validate_json(document, media["schema"], json.loads(response.text), where)
    elif media_type == "application/x-ndjson":
        lines = response.text.splitlines()
        assert lines, f"{where}: an empty stream"
        for line in lines:
            validate_json(document, media["x-event-data"], json.loads(line), where + " (line)")
    elif media_type == "text/event-stream":
        separator = "\r\n\r\n" if "\r\n" in response.text else "\n\n"
        events = [block for block in response.text.split(separator) if block]
        assert events, f"{where}: an empty stream"
        for block in events:
            data = "\n".join(line.removeprefix("data: ") for line in block.splitlines() if line.startswith("data: "))
            if data == "[DONE]":
                continue
            event = json.loads(data) if "x-event-data" in media and media["x-event-data"].get("type") != "string" else data
            validate_json(document, media["x-event-data"], event, where + " (event)")


def case_ids(cases: list[dict[str, Any]]) -> list[str]:
    return [f"{case['method']} {case['path']} {case['status']}" for case in cases]
