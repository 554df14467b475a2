"""HTTP behaviour shared by every route: health, access control, limits, unknown routes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from waitress.adjustments import Adjustments

from testing.assertions import assert_json_error
from testing.raw_http import EXPECT_TOO_LARGE, MAX_BODY, POST_HEAD, assert_json_refusal, raw_exchange, read_reply
from testing.servers import ServerProcess, running_worker, start_worker
from testing.tiny_models import TINY_CHAT, tiny_settings

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


# -- what waitress answers itself, before the app sees a request (raw sockets: no client library
# sends these)

MAX_HEADER = Adjustments.max_request_header_size  # waitress's default, which the worker keeps


# Each request ends exactly where waitress refuses it: no unread bytes left behind, so the close
# after the answer is a clean one on every run.
WAITRESS_REFUSALS = {
    "body over MAX_REQUEST_BYTES": (POST_HEAD + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode(),
                                    413, "request_too_large", "larger than MAX_REQUEST_BYTES"),
    "chunked body over MAX_REQUEST_BYTES": (POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                                            + f"{MAX_BODY + 1:x}\r\n".encode().ljust(MAX_BODY + 1, b"x"),
                                            413, "request_too_large", "larger than MAX_REQUEST_BYTES"),
    "bad Content-Length": (POST_HEAD + b"Content-Length: ten\r\n\r\n", 400, None, "Content-Length is invalid"),
    "bad chunk framing": (POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, None, "Invalid chunk size"),
    "bad request line": (b"NONSENSE\r\n\r\n", 400, None, "not valid HTTP/1.1"),
    "unsupported Transfer-Encoding": (POST_HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 501,
                                      "unsupported_transfer_encoding", "only chunked"),
    "headers over the limit": (b"GET /health HTTP/1.1\r\nX-Padding: ".ljust(MAX_HEADER, b"p"), 431,
                               "request_headers_too_large", f"larger than {MAX_HEADER} bytes"),
}


@pytest.mark.parametrize(("request_bytes", "status", "code", "mentions"), WAITRESS_REFUSALS.values(),
                         ids=WAITRESS_REFUSALS.keys())
def test_what_waitress_refuses_is_a_json_error_from_the_worker(tiny_worker: ServerProcess, request_bytes: bytes,
                                                                status: int, code: str | None, mentions: str) -> None:
    """waitress answered these in plain text, without X-Worker-Pid: a client parsing our errors got none."""
    assert_json_refusal(raw_exchange(tiny_worker.port, request_bytes), tiny_worker.pid, status, code, mentions)


def test_a_refusal_of_waitress_echoes_the_clients_request_id(tiny_worker: ServerProcess) -> None:
    """waitress answers these before the app's hooks run: the id must not be lost there either."""
    request = POST_HEAD + b"X-Request-Id: trace-413\r\n" + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    reply = raw_exchange(tiny_worker.port, request)
    assert reply.status == 413 and reply.headers["x-request-id"] == "trace-413", reply


def test_expect_continue_with_a_body_over_the_limit_is_a_413_not_a_continue(tiny_worker: ServerProcess) -> None:
    """A client that asks before sending a body too large must hear 413 at once. waitress said
    `100 Continue` and then waited for a body it was going to refuse."""
    assert_json_refusal(raw_exchange(tiny_worker.port, EXPECT_TOO_LARGE), tiny_worker.pid, 413, "request_too_large",
                        "MAX_REQUEST_BYTES")


def _assert_shape_of(path: str, status: int, body: object, kind: str) -> None:
    """The error body in the shape of the interface `path` belongs to (api/wire/shapes.py)."""
    assert isinstance(body, dict), body
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == kind, body
    elif path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
    else:
        assert body["error"]["type"] in ("invalid_request_error", "server_error") and "message" in body["error"], body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                                  "/api/chat", "/api/embed"])
def test_a_body_over_the_limit_is_refused_in_the_shape_of_the_route_s_interface(tiny_worker: ServerProcess,
                                                                                  path: str) -> None:
    """waitress refuses it before any route runs; its answer still speaks the route's wire format
    (it was OpenAI's everywhere: an Anthropic or Ollama client got an error object it does not read)."""
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n"
    for request_bytes in (head + "\r\n", head + "Expect: 100-continue\r\n\r\n"):  # refused from the head alone
        reply = raw_exchange(tiny_worker.port, request_bytes.encode())
        assert reply.status == 413 and reply.headers["x-worker-pid"] == str(tiny_worker.pid)
        _assert_shape_of(path, reply.status, json.loads(reply.body), "request_too_large")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/api/chat"])
def test_a_wrong_method_is_a_405_in_the_route_s_shape_naming_the_allowed_ones(tiny_worker: ServerProcess,
                                                                               path: str) -> None:
    response = requests.get(tiny_worker.url + path, timeout=10)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    _assert_shape_of(path, 405, response.json(), "invalid_request_error")


def test_expect_continue_with_a_body_within_the_limit_still_continues(tiny_worker: ServerProcess) -> None:
    body = json.dumps({"prompt": "x", "temperature": 0, "max_tokens": 3}).encode()
    with socket.create_connection(("127.0.0.1", tiny_worker.port), timeout=20) as connection:
        connection.sendall(POST_HEAD + b"Expect: 100-continue\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert connection.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(body)
        reply = read_reply(connection)
    assert reply.status == 200, reply
    assert json.loads(reply.body)["choices"][0]["text"] == "yz"  # the tiny model: x -> y -> z -> end


def test_oversized_body_is_a_413(tiny_worker: ServerProcess) -> None:
    body = b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    response = requests.post(tiny_worker.url + "/gpt4all_api", data=body,
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413


def test_a_body_of_exactly_max_request_bytes_is_accepted(tiny_worker: ServerProcess) -> None:
    """MAX_REQUEST_BYTES is the largest body accepted; waitress refuses at its own limit, not above it."""
    body = json.dumps({"prompt": "x", "temperature": 0, "max_tokens": 3}).encode().ljust(MAX_BODY, b" ")
    reply = raw_exchange(tiny_worker.port, POST_HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert reply.status == 200, reply
    assert json.loads(reply.body)["choices"][0]["text"] == "yz"


LONG = "word " * 400  # 2000 byte tokens > the tiny model's 512


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),
    ("/gpt4all_api", {"prompt": LONG}, "prompt"),
], ids=["chat", "completions", "original"])
def test_prompt_longer_than_the_context_is_a_400_naming_the_clients_field(
        tiny_worker: ServerProcess, path: str, body: dict, field: str) -> None:
    response = requests.post(tiny_worker.url + path, timeout=30, json=body)
    assert_json_error(response, 400, "context window")
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == field
    # the worker is fine afterwards
    ok = requests.post(tiny_worker.url + "/v1/completions", json={"prompt": "a", "temperature": 0}, timeout=30)
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def keyed_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("keyed"), **tiny_settings(API_KEY=KEY)) as worker:
        yield worker


def test_api_key_required_everywhere_but_health(keyed_worker: ServerProcess) -> None:
    url = keyed_worker.url
    assert requests.get(url + "/health", timeout=10).status_code == 200
    for method, path in [("get", "/v1/models"), ("post", "/gpt4all_api"), ("post", "/v1/chat/completions"),
                         ("get", "/no-such-route")]:
        response = requests.request(method, url + path, json={"prompt": "x"}, timeout=10)
        assert_json_error(response, 401, "API key")
    wrong = requests.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("get", "/v1/models", {}), ("post", "/v1/chat/completions", {"Authorization": "Bearer nope"}),
    ("post", "/v1/completions", {}), ("post", "/v1/embeddings", {}), ("post", "/v1/responses", {}),
    ("post", "/v1/messages", {"x-api-key": "nope"}), ("post", "/v1/messages/count_tokens", {}),
    ("get", "/api/tags", {}), ("post", "/api/chat", {"Authorization": "Bearer nope"}), ("post", "/v0/chat", {}),
    ("post", "/generate", {}), ("post", "/gpt4all_api", {}), ("get", "/no-such-route", {}),
])
def test_every_401_names_the_bearer_scheme(keyed_worker: ServerProcess, method: str, path: str,
                                           headers: dict[str, str]) -> None:
    """RFC 9110 asks a 401 to say how to authenticate: every wire format's refusal carries it."""
    response = requests.request(method, keyed_worker.url + path, json={"prompt": "x"}, headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    ok = requests.request(method, keyed_worker.url + path, json={}, headers={"X-Api-Key": KEY}, timeout=10)
    assert ok.status_code != 401 and "WWW-Authenticate" not in ok.headers


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


def test_a_second_model_that_cannot_be_loaded_on_demand_is_a_server_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The server lists the file as installed, and the client named it correctly: that it is broken
    is the server's fault (500), not the request's (it was a 400). The worker goes on serving."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / TINY_CHAT).write_bytes((tiny_model_dir / TINY_CHAT).read_bytes())
    whole = (tiny_model_dir / TINY_CHAT).read_bytes()
    (model_dir / "truncated.gguf").write_bytes(whole[: len(whole) // 2])  # header intact, tensors cut off
    with running_worker(model_dir, tmp_path, **tiny_settings(EMBEDDING_MODEL_NAME="none.gguf")) as worker:
        listed = [model["id"] for model in requests.get(worker.url + "/v1/models", timeout=10).json()["data"]]
        assert "truncated" in listed, listed
        response = requests.post(worker.url + "/v1/completions", timeout=30,
                                 json={"model": "truncated", "prompt": "x", "max_tokens": 2})
        assert_json_error(response, 500, "could not be loaded")
        assert response.json()["error"]["code"] == "model_load_failed"
        assert str(tmp_path) not in response.text, "local paths stay in the log"
        again = requests.post(worker.url + "/v1/completions", timeout=30, json={"prompt": "x", "max_tokens": 2, "temperature": 0})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == "yz"


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
        assert str(tmp_path) not in health.text + response.text, "local paths stay in the log"
    finally:
        assert worker.stop() == []
