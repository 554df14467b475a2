"""The OpenAPI document: valid OpenAPI 3.1, covering every route, its request schemas enforced by the
routes exactly as documented, the /docs page served with no internet, and the contract cases that
need a running worker (testing/contract.py: streams through waitress, limits of the model file)
checked against the document; tests/wire/test_wire_shapes.py checks every case in-process."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from api.access import OPEN_PATHS
from api.openapi import openapi_path
from testing.apps import make_app
from testing.contract import CASES, case_ids, check_response, request_schema, resolve, validate_json
from testing.servers import ServerProcess

KEY = "docs-key"
SKIPPED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return make_app(tmp_path)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def document_of(client: FlaskClient, **headers: str) -> dict[str, Any]:
    response = client.get("/openapi.json", headers=headers)
    assert response.status_code == 200, response.text
    return response.get_json()


# -- the document itself


@pytest.mark.parametrize("settings", [{}, {"API_KEY": KEY, "DOCS_PUBLIC": "true"}, {"ROUTE": "/ask"}])
def test_the_document_is_valid_openapi_3_1(tmp_path: Path, settings: dict[str, str]) -> None:
    app = make_app(tmp_path, **settings)
    document = document_of(app.test_client(), **({"X-Api-Key": KEY} if "API_KEY" in settings else {}))
    assert document["openapi"] == "3.1.0"
    validate_openapi(document)
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_every_route_and_method_is_documented(app: Flask, client: FlaskClient) -> None:
    document = document_of(client)
    served = {(openapi_path(rule.rule), method.lower()) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in (rule.methods or set()) - SKIPPED_METHODS}
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert documented == served
    for path in ["/health", "/gpt4all_api", "/v1/chat/completions", "/v1/chat/completions/", "/v1/completions/",
                 "/v1/models/{model}", "/v1/engines/{engine_id}", "/v1/health/", "/v0/language-models/retrieve",
                 "/v0/models", "/generate", "/agenerate", "/embeddings", "/check", "/openapi.json", "/docs", "/",
                 "/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate", "/api/embed",
                 "/api/embeddings"]:
        assert path in document["paths"], path
    ids = [operation["operationId"] for operations in document["paths"].values() for operation in operations.values()]
    assert len(ids) == len(set(ids))


def test_the_configured_route_is_the_one_documented(tmp_path: Path) -> None:
    document = document_of(make_app(tmp_path, ROUTE="/ask").test_client())
    assert "/ask" in document["paths"] and "/gpt4all_api" not in document["paths"]
    assert "POST /ask" in document["info"]["description"]


def test_the_document_is_generated_from_the_validation_models(client: FlaskClient) -> None:
    from api.wire import anthropic_schemas, ollama_schemas, responses_schemas, schemas

    document = document_of(client)
    expected = {"/v1/chat/completions": schemas.ChatCompletionRequest, "/v1/completions": schemas.CompletionRequest,
                "/v1/embeddings": schemas.EmbeddingRequest, "/gpt4all_api": schemas.OriginalRequest,
                "/v0/language-models/retrieve": schemas.V0RetrieveRequest, "/generate": schemas.LlmGenerateRequest,
                "/embeddings": schemas.LlmEmbeddingsRequest, "/v1/responses": responses_schemas.ResponsesRequest,
                "/v1/messages": anthropic_schemas.MessagesRequest,
                "/v1/messages/count_tokens": anthropic_schemas.CountTokensRequest,
                "/api/chat": ollama_schemas.OllamaChatRequest, "/api/generate": ollama_schemas.OllamaGenerateRequest,
                "/api/embed": ollama_schemas.OllamaEmbedRequest, "/api/embeddings": ollama_schemas.OllamaEmbeddingsRequest,
                "/api/show": ollama_schemas.OllamaShowRequest}
    for path, model in expected.items():
        reference = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert reference == f"#/components/schemas/{model.__name__}"
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        generated.pop("$defs", None)
        assert document["components"]["schemas"][model.__name__] == generated


# -- what the document says about request bodies is what the routes enforce

VALID_BODIES: dict[str, dict[str, Any]] = {
    "/gpt4all_api": {"prompt": "Hi"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"prompt": "Hi"},
    "/v1/embeddings": {"input": "Hi"},
    "/v0/language-models/chat-completions": {"messages": [{"role": "user", "content": "Hi"}]},
    "/v0/language-models/generate": {"prompt": "Hi"},
    "/v0/language-models/retrieve": {"model_name": "tiny-chat"},
    "/generate": {"prompt": "Hi"},
    "/agenerate": {"prompt": "Hi"},
    "/embeddings": {"text": "Hi"},
    "/v1/responses": {"input": "Hi"},
    "/v1/messages": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "Hi"}]},
    "/api/chat": {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]},
    "/api/generate": {"model": "tiny-chat", "prompt": "Hi"},
    "/api/show": {"model": "tiny-chat"},
    "/api/embed": {"model": "tiny-embed", "input": "Hi"},
    "/api/embeddings": {"model": "tiny-embed", "prompt": "Hi"},
}


def error_param(response: Any) -> str | None:
    """The field a 400 names: OpenAI's error object says it in `param`; shapes without such a member
    (Anthropic's error object, a bare error message) in the message, which starts with the field's
    name in quotes like all of ours."""
    error = response.get_json()["error"]
    if isinstance(error, dict) and "param" in error:
        return error["param"]
    match = re.match(r"'([^']+)'", error["message"] if isinstance(error, dict) else error)
    return match.group(1) if match else None


def body_operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        if "post" in operations and "requestBody" in operations["post"]:
            yield path, request_schema(document, path, "post")  # type: ignore[misc]


def simple_types(document: dict[str, Any], schema: dict[str, Any]) -> set[str] | None:
    """The JSON types a property accepts, or None when it may also be an object (or anything)."""
    schema = resolve(document, schema)
    if "anyOf" in schema:
        kinds: set[str] = set()
        for option in schema["anyOf"]:
            option_kinds = simple_types(document, option)
            if option_kinds is None:
                return None
            kinds |= option_kinds
        return kinds
    kind = schema.get("type")
    return None if kind in (None, "object") else {kind}


def test_every_documented_request_body_is_known_here(client: FlaskClient) -> None:
    assert {path.rstrip("/") for path, _ in body_operations(document_of(client))} == set(VALID_BODIES)


def test_documented_required_fields_are_required(client: FlaskClient) -> None:
    document = document_of(client)
    for path, schema in body_operations(document):
        required = schema.get("required", [])
        assert required, f"{path} documents no required field"
        response = client.post(path, json={"unrelated": 1})
        assert response.status_code == 400, (path, response.text)
        assert error_param(response) == required[0], path


def test_documented_types_are_enforced_field_by_field(client: FlaskClient) -> None:
    document = document_of(client)
    checked = 0
    for path, schema in body_operations(document):
        for name, prop in schema["properties"].items():
            if simple_types(document, prop) is None:
                continue
            body = {**VALID_BODIES[path.rstrip("/")], name: {"not": "valid"}}
            response = client.post(path, json=body)
            assert response.status_code == 400, (path, name, response.text)
            assert error_param(response) == name, (path, name, response.get_json())
            checked += 1
    assert checked > 60


def out_of_range(schema: dict[str, Any]) -> list[object]:
    values: list[object] = []
    if "minimum" in schema:
        values.append(schema["minimum"] - 1)
    if "exclusiveMinimum" in schema:
        values.append(schema["exclusiveMinimum"])
    if "maximum" in schema:
        values.append(schema["maximum"] + 1)
    if "exclusiveMaximum" in schema:
        values.append(schema["exclusiveMaximum"])
    if "enum" in schema:
        values.append("not-" + str(schema["enum"][0]))
    return values


def test_documented_ranges_and_choices_are_enforced(client: FlaskClient) -> None:
    document = document_of(client)
    checked = 0
    for path, schema in body_operations(document):
        for name, prop in schema["properties"].items():
            options = [resolve(document, option) for option in prop.get("anyOf", [prop])]
            for option in options:
                for value in out_of_range(option):
                    response = client.post(path, json={**VALID_BODIES[path.rstrip("/")], name: value})
                    assert response.status_code == 400, (path, name, value, response.text)
                    assert error_param(response) == name
                    checked += 1
    assert checked > 40


# -- access to the documentation


def test_docs_need_the_key_by_default_when_one_is_set(tmp_path: Path) -> None:
    client = make_app(tmp_path, API_KEY=KEY).test_client()
    for path in ["/openapi.json", "/docs", "/docs/static/swagger-ui.css", "/v1/models"]:
        assert client.get(path).status_code == 401, path
    assert client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    document = document_of(client, **{"X-Api-Key": KEY})
    assert document["security"] == [{"bearer": []}, {"apiKeyHeader": []}]
    for path in ["/health", "/ready", "/check", "/v1/health", "/v1/health/", "/", "/api/version"]:
        assert document["paths"][path]["get"]["security"] == []
        assert client.get(path).status_code in (200, 503), path  # open: no key needed
    assert "security" not in document["paths"]["/v0/language-models/retrieve"]["post"]
    assert "401" in document["paths"]["/v0/language-models/retrieve"]["post"]["responses"]


def test_docs_public_opens_only_the_documentation(tmp_path: Path) -> None:
    client = make_app(tmp_path, API_KEY=KEY, DOCS_PUBLIC="true").test_client()
    for path in ["/openapi.json", "/docs", "/docs/static/swagger-ui-bundle.js"]:
        assert client.get(path).status_code == 200, path
    for method, path in [("get", "/v1/models"), ("post", "/v0/language-models/retrieve"), ("get", "/docsx")]:
        assert getattr(client, method)(path, json={"model_name": "x"}).status_code == 401, path


def test_without_a_key_the_document_has_no_security(client: FlaskClient) -> None:
    document = document_of(client)
    assert "security" not in document and "securitySchemes" not in document["components"]
    assert "401" not in document["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_the_docs_page_works_with_no_internet(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "://" not in html, "the page must not load anything from another host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"} <= set(assets)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.data) > 100, asset
    assert '"/openapi.json"' in html and "validatorUrl: null" in html
    assert client.get("/docs/static/../../api/config.py").status_code == 404
    assert client.get("/docs/static/swagger-editor-bundle.js").status_code == 404


# -- the contract: real responses of a running worker match the document


@pytest.fixture(scope="module")
def worker_document(tiny_worker: ServerProcess) -> dict[str, Any]:
    return requests.get(tiny_worker.url + "/openapi.json", timeout=10).json()


REAL_CASES = [case for case in CASES if case["real"]]


@pytest.mark.parametrize("case", REAL_CASES, ids=case_ids(REAL_CASES))
def test_real_responses_match_the_document(tiny_worker: ServerProcess, worker_document: dict[str, Any],
                                           case: dict[str, Any]) -> None:
    response = requests.request(case["method"], tiny_worker.url + case["path"], json=case["body"], headers=case["headers"],
                                timeout=30)
    assert response.status_code == case["status"], response.text[:500]
    check_response(worker_document, case, response)


def test_access_refusals_match_the_document_too(tmp_path: Path) -> None:
    client = make_app(tmp_path, API_KEY=KEY).test_client()
    document = document_of(client, **{"X-Api-Key": KEY})
    for method, path, template in [("post", "/v0/language-models/retrieve", None), ("post", "/generate", None),
                                   ("post", "/v1/responses", None), ("post", "/v1/messages", None),
                                   ("get", "/v1/models/x", "/v1/models/{model}"), ("get", "/openapi.json", None),
                                   ("post", "/api/chat", None), ("get", "/api/tags", None)]:
        response = getattr(client, method)(path, json={"model_name": "x"})
        assert response.status_code == 401
        schema = document["paths"][template or path][method]["responses"]["401"]["content"]["application/json"]["schema"]
        validate_json(document, schema, response.get_json(), f"{method} {path}")


def test_the_open_paths_are_real_routes_and_the_document_marks_exactly_those_open(tmp_path: Path) -> None:
    """api.access.OPEN_PATHS is the one declaration of what needs no key (the supervisor's fallback
    reads it too, without Flask): each entry is a route, and the document says so of it alone."""
    app = make_app(tmp_path, API_KEY=KEY)
    rules = {rule.rule for rule in app.url_map.iter_rules()}
    assert rules >= OPEN_PATHS
    document = document_of(app.test_client(), **{"X-Api-Key": KEY})
    open_in_document = {path for path, operations in document["paths"].items()
                        if all(operation.get("security") == [] for operation in operations.values())}
    assert open_in_document == set(OPEN_PATHS)


