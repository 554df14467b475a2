"""Faults on the Responses and Anthropic Messages routes, with real sockets: a client that leaves a
stream mid-way must stop its generation, and a generation over its time limit ends in each format's
own error (a status before the stream, an in-band event after it).

A chat prompt always ends in the template's "assistant\\n", after which the tiny chat model says the
alphabet and stops: too short to leave in the middle. These workers serve a tiny model whose chat
template is the messages' text alone, so a conversation that ends in "0" counts digits forever.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testing.servers import ServerProcess, running_worker
from testing.tiny_models import TINY_RAW_TEMPLATE, build_tiny_chat_model, tiny_settings

COUNTER = "tiny-counter.gguf"
COUNT = [{"role": "user", "content": "0"}]
ENDLESS = {
    "/v1/responses": {"input": "0", "temperature": 0, "max_output_tokens": 100_000_000, "stream": True},
    "/v1/messages": {"messages": COUNT, "max_tokens": 100_000_000, "temperature": 0, "stream": True},
}
PATHS = list(ENDLESS)


@pytest.fixture(scope="module")
def counter_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("counter-model")
    build_tiny_chat_model(folder / COUNTER, chat_template=TINY_RAW_TEMPLATE)
    return folder


def _worker(model_dir: Path, folder: Path, **settings: object) -> Iterator[ServerProcess]:
    with running_worker(model_dir, folder, **tiny_settings(MODEL_NAME=COUNTER, **settings)) as worker:
        yield worker


@pytest.fixture(scope="module")
def counter_worker(counter_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _worker(counter_model_dir, tmp_path_factory.mktemp("counter"))


@pytest.fixture(scope="module")
def hasty_worker(counter_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _worker(counter_model_dir, tmp_path_factory.mktemp("hasty"), REQUEST_TIMEOUT=1, STALL_TIMEOUT=1)


def raw_request(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def open_stream_and_hang_up(worker: ServerProcess, path: str, read_bytes: int = 4000) -> bytes:
    """Start an endless stream on a raw socket, read some of it, then reset the connection."""
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as connection:
        connection.sendall(raw_request(path, ENDLESS[path]))
        received = b""
        while len(received) < read_bytes:
            received += connection.recv(4096)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    return received


def open_stream_stop_reading_and_close(worker: ServerProcess, path: str) -> bytes:
    """Start an endless stream, read a little, stop reading until the worker's buffers fill (waitress
    then stops watching the socket), then close it, as a client library abandoning a stream does."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.settimeout(10)
    connection.connect(("127.0.0.1", worker.port))
    try:
        connection.sendall(raw_request(path, ENDLESS[path]))
        received = connection.recv(4096)
        time.sleep(2)  # not reading: the worker's output piles up in its buffers
    finally:
        connection.close()
    return received


def assert_the_model_is_free_again(worker: ServerProcess) -> None:
    """One generation at a time: this one runs only once the abandoned one has stopped (left running,
    the endless one would hold the model for REQUEST_TIMEOUT, 300 s)."""
    response = requests.post(worker.url + "/v1/messages", timeout=15,
                             json={"messages": [{"role": "user", "content": "w"}], "max_tokens": 10, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["content"] == [{"type": "text", "text": "xyz"}]


@pytest.mark.parametrize("path", PATHS)
def test_a_client_that_leaves_mid_stream_stops_the_generation(counter_worker: ServerProcess, path: str) -> None:
    received = open_stream_and_hang_up(counter_worker, path)
    assert b"200 OK" in received and b"event: " in received and b"\"9\"" in received  # digits one event each
    assert_the_model_is_free_again(counter_worker)


@pytest.mark.parametrize("path", PATHS)
def test_a_client_that_stopped_reading_and_closed_stops_the_generation(counter_worker: ServerProcess, path: str) -> None:
    assert b"200 OK" in open_stream_stop_reading_and_close(counter_worker, path)
    assert_the_model_is_free_again(counter_worker)


@pytest.mark.parametrize("path", PATHS)
def test_a_pipelining_client_that_closed_stops_the_generation(counter_worker: ServerProcess, path: str) -> None:
    """A whole-reply request with a second one queued behind it, then the connection closed unread:
    waitress reads nothing more while the first runs, so only a look at the socket shows nobody is there."""
    request = raw_request(path, {**ENDLESS[path], "stream": False})
    with socket.create_connection(("127.0.0.1", counter_worker.port), timeout=10) as connection:
        connection.sendall(request + request)
        time.sleep(1)  # both requests read by the worker, the first one generating
    assert_the_model_is_free_again(counter_worker)


@pytest.mark.parametrize("path", PATHS)
def test_a_generation_over_its_time_is_a_504_in_the_route_s_shape(hasty_worker: ServerProcess, path: str) -> None:
    response = requests.post(hasty_worker.url + path, json={**ENDLESS[path], "stream": False}, timeout=30)
    assert response.status_code == 504
    body = response.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "timeout_error"
    else:
        assert body["error"]["code"] == "timeout"
    assert "REQUEST_TIMEOUT" in json.dumps(body)


def test_a_responses_stream_over_its_time_ends_with_error_and_response_failed(hasty_worker: ServerProcess) -> None:
    response = requests.post(hasty_worker.url + "/v1/responses", json=ENDLESS["/v1/responses"], timeout=30)
    assert response.status_code == 200  # headers were already sent when the limit struck
    *_, error_block, failed_block = response.text.strip().split("\n\n")
    error = json.loads(error_block.split("data: ", 1)[1])
    failed = json.loads(failed_block.split("data: ", 1)[1])
    assert error_block.startswith("event: error\n") and error["type"] == "error" and error["code"] == "timeout"
    assert "REQUEST_TIMEOUT" in error["message"]
    assert failed_block.startswith("event: response.failed\n") and failed["sequence_number"] == error["sequence_number"] + 1
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "server_error"
    assert failed["response"]["output"][0]["content"][0]["text"].startswith("123456789")


def test_a_messages_stream_over_its_time_ends_with_an_error_event(hasty_worker: ServerProcess) -> None:
    response = requests.post(hasty_worker.url + "/v1/messages", json=ENDLESS["/v1/messages"], timeout=30)
    assert response.status_code == 200
    last = response.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\n")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "timeout_error"
