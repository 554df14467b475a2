"""HTTP behaviour shared by every route: health, access control, limits, unknown routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import tiny_settings
from tests.servers import ServerProcess, start_worker
from tests.test_api_original import assert_json_error

KEY = "s3cret-key"


def test_health_reports_the_model(tiny_worker: ServerProcess) -> None:
    response = requests.get(tiny_worker.url + "/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model": "tiny-chat.gguf"}
    assert response.headers["X-Worker-Pid"] == str(tiny_worker.pid)


def test_unknown_route_is_a_json_404(tiny_worker: ServerProcess) -> None:
    assert_json_error(requests.get(tiny_worker.url + "/nope", timeout=10), 404, "no route GET /nope")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/gpt4all_api", {"POST", "OPTIONS"}),
    ("DELETE", "/v1/chat/completions", {"POST", "OPTIONS"}),
    ("TRACE", "/v1/models", {"GET", "HEAD", "OPTIONS"}),
    ("PUT", "/health", {"GET", "HEAD", "OPTIONS"}),
])
def test_a_405_says_which_methods_are_allowed(tiny_worker: ServerProcess, method: str, path: str,
                                             allowed: set[str]) -> None:
    """RFC 9110: a 405 carries Allow. It is still our JSON error, tagged with the worker."""
    response = requests.request(method, tiny_worker.url + path, timeout=10)
    assert_json_error(response, 405, f"{method} is not allowed")
    assert {name.strip() for name in response.headers["Allow"].split(",")} == allowed
    assert response.headers["X-Worker-Pid"] == str(tiny_worker.pid)


@pytest.mark.parametrize("route", ["/gpt4all_api", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                   "/generate", "/embeddings"])
def test_deeply_nested_json_is_a_400(tiny_worker: ServerProcess, route: str) -> None:
    """Python's JSON parser recurses: 100,000 open brackets were a RecursionError and a 500."""
    response = requests.post(tiny_worker.url + route, data=b"[" * 100_000,
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert_json_error(response, 400, "nested too deeply")


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/embeddings", b'{"input": "\\ud800"}', "input"),
    ("/v1/embeddings", b'{"input": ["fine", "\\udc00 alone"]}', "input[1]"),
    ("/v1/completions", b'{"prompt": "a", "stop": "\\ud800"}', "stop"),
    ("/gpt4all_api", b'{"prompt": "hi", "persona": "\\ud83d"}', "persona"),
    ("/embeddings", b'{"text": "\\ud800"}', "text"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(tiny_worker: ServerProcess, route: str, body: bytes,
                                                    param: str) -> None:
    """JSON can spell half of a UTF-16 pair alone; Python parses it into a string nothing can encode,
    and chat content or embedding input with one was a UnicodeEncodeError and a 500."""
    response = requests.post(tiny_worker.url + route, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert_json_error(response, 400, "not valid Unicode")
    assert response.json()["error"]["param"] == param


def test_a_lone_surrogate_in_a_field_name_is_a_400(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/embeddings", data=b'{"input": "a", "\\ud800": 1}',
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert_json_error(response, 400, "a field name is not valid Unicode")


def test_a_surrogate_pair_is_text_like_any_other(tiny_worker: ServerProcess) -> None:
    """Only unpaired halves are refused: an escaped pair is one character (here an emoji)."""
    response = requests.post(tiny_worker.url + "/v1/embeddings", data=b'{"input": "smile \\ud83d\\ude00"}',
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text


def test_oversized_body_is_a_413(tiny_worker: ServerProcess) -> None:
    body = b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    response = requests.post(tiny_worker.url + "/gpt4all_api", data=body,
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413


def test_prompt_longer_than_the_context_is_a_400(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "word " * 400}]})  # 2000 byte tokens > 512
    assert_json_error(response, 400, "context window")
    assert response.json()["error"]["code"] == "context_length_exceeded"
    # the worker is fine afterwards
    ok = requests.post(tiny_worker.url + "/v1/completions", json={"prompt": "a", "temperature": 0}, timeout=30)
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def keyed_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    worker = start_worker(tiny_model_dir, tmp_path_factory.mktemp("keyed"), **tiny_settings(API_KEY=KEY))
    try:
        yield worker.wait_ready()
    finally:
        assert worker.stop() == []


def test_api_key_required_everywhere_but_health(keyed_worker: ServerProcess) -> None:
    url = keyed_worker.url
    assert requests.get(url + "/health", timeout=10).status_code == 200
    for method, path in [("get", "/v1/models"), ("post", "/gpt4all_api"), ("post", "/v1/chat/completions"),
                         ("get", "/no-such-route")]:
        response = requests.request(method, url + path, json={"prompt": "x"}, timeout=10)
        assert_json_error(response, 401, "API key")
    wrong = requests.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401


def test_api_key_accepted_as_bearer_or_header(keyed_worker: ServerProcess) -> None:
    url = keyed_worker.url + "/v1/models"
    assert requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    assert requests.get(url, headers={"X-Api-Key": KEY}, timeout=10).status_code == 200


@pytest.mark.parametrize(("authorized", "status"), [("10.1.2.3, 192.168.0.0/16", 403), ("127.0.0.0/8", 200),
                                                    ("localhost", 200)])
def test_authorized_urls_limit_clients(tiny_model_dir: Path, tmp_path: Path, authorized: str, status: int) -> None:
    worker = start_worker(tiny_model_dir, tmp_path, **tiny_settings(AUTHORIZED_URLS=authorized))
    try:
        if status == 200:
            worker.wait_ready()
        else:
            worker.wait_answering()
        health = requests.get(worker.url + "/health", timeout=10)
        response = requests.get(worker.url + "/v1/models", timeout=10)
        assert response.status_code == status, response.text
        assert health.status_code == (403 if status == 403 else 200)
        if status == 403:
            assert response.json()["error"]["code"] == "forbidden"
    finally:
        assert worker.stop() == []


def test_a_broken_model_is_reported_not_hidden(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A file that is not a model: /health and every inference route say why, with Retry-After."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "broken.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 40)
    worker = start_worker(model_dir, tmp_path, **tiny_settings(MODEL_NAME="broken.gguf"))
    try:
        worker.wait_ready(accept=lambda status: status == 503 and "reason" in requests.get(worker.url + "/health").json())
        health = requests.get(worker.url + "/health", timeout=10)
        assert health.json()["status"] == "failed" and "broken.gguf" in health.json()["reason"]
        response = requests.post(worker.url + "/v1/chat/completions", timeout=10,
                                 json={"messages": [{"role": "user", "content": "Hi"}]})
        assert_json_error(response, 503, "could not be loaded")
        assert response.headers["Retry-After"] == "30"
        assert response.json()["error"]["code"] == "model_load_failed"
    finally:
        assert worker.stop() == []
