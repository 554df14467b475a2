"""Faults inside one worker: clients that leave mid-stream, generations over their time limit,
and many threads at once on one model (two concurrent gpt4all generations would crash it)."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testing.servers import ServerProcess, running_worker
from testing.tiny_models import TINY_CHAT_REPLY, tiny_settings

ENDLESS = {"prompt": "0", "temperature": 0, "max_tokens": 100_000_000, "stream": True}  # digits forever


def raw_completion_request(body: dict) -> bytes:
    """A whole HTTP/1.1 request for /v1/completions, for clients that misbehave on a raw socket."""
    payload = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)


def open_stream_and_hang_up(worker: ServerProcess, body: dict, read_bytes: int = 2000) -> bytes:
    """Start a streamed request on a raw socket, read a little of it, then disconnect abruptly."""
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as connection:
        connection.sendall(raw_completion_request(body))
        received = b""
        while len(received) < read_bytes:
            received += connection.recv(4096)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    return received


def open_stream_stop_reading_and_close(worker: ServerProcess, body: dict, *, reset: bool) -> bytes:
    """Start a streamed request, read a little, then stop reading long enough for the worker's
    send buffers to fill (so waitress stops reading the socket) before closing it, as a client
    library does when it abandons a streamed response it stopped reading."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.settimeout(10)
    connection.connect(("127.0.0.1", worker.port))
    try:
        connection.sendall(raw_completion_request(body))
        received = connection.recv(4096)
        time.sleep(2)  # not reading: the worker's output piles up in its buffers
        if reset:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        connection.close()
    return received


def send_pipelined_and_close(worker: ServerProcess, body: dict) -> None:
    """Send a whole-reply request and a second one behind it on the same connection, then close it
    without reading. waitress reads no further while a request waits its turn behind the running one,
    so only a look at the socket itself shows that the client is gone."""
    request = raw_completion_request(body)
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as connection:
        connection.sendall(request + request)
        time.sleep(1)  # both requests read by the worker, the first one generating


def assert_the_model_is_free_again(worker: ServerProcess) -> None:
    """One generation at a time: this request can only run once the abandoned one has stopped.
    Left running, the endless one would hold the model for hours."""
    started = time.monotonic()
    response = requests.post(worker.url + "/v1/chat/completions", timeout=15,
                             json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
    assert time.monotonic() - started < 5


def test_disconnect_mid_stream_stops_the_generation(tiny_worker: ServerProcess) -> None:
    received = open_stream_and_hang_up(tiny_worker, ENDLESS)
    assert b"200 OK" in received and b"data: " in received
    assert_the_model_is_free_again(tiny_worker)


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_stopped_reading_and_closed_stops_the_generation(tiny_worker: ServerProcess,
                                                                       reset: bool) -> None:
    """waitress stops reading a socket while output waits to be sent, so it never saw this close."""
    received = open_stream_stop_reading_and_close(tiny_worker, ENDLESS, reset=reset)
    assert b"200 OK" in received
    assert_the_model_is_free_again(tiny_worker)


def test_a_requests_client_that_abandons_a_stream_past_the_context_window_stops_the_generation(
        tiny_worker: ServerProcess) -> None:
    """The case CI once failed on: `requests` closes a streamed response it stopped reading while
    the generation, past the context window, shifts its context again and again."""
    shifts_before = tiny_worker.log_text().count("context full")
    with requests.post(tiny_worker.url + "/v1/completions", json=ENDLESS, stream=True, timeout=30) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the connection early
        assert any(line.startswith(b"data: ") for line in itertools.islice(lines, 3))
        deadline = time.monotonic() + 20
        while tiny_worker.log_text().count("context full") < shifts_before + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tiny_worker.log_text().count("context full") >= shifts_before + 2, "the context never shifted"
    assert_the_model_is_free_again(tiny_worker)


def test_a_pipelining_client_that_closed_stops_the_generation(tiny_worker: ServerProcess) -> None:
    send_pipelined_and_close(tiny_worker, {**ENDLESS, "stream": False})
    assert_the_model_is_free_again(tiny_worker)


ENDLESS_BATCH = {**ENDLESS, "prompt": ["0"] * 32}  # 32 endless generations, one after the other


def test_a_client_that_leaves_a_streamed_batch_stops_it_and_no_later_prompt_starts(tiny_worker: ServerProcess) -> None:
    received = open_stream_and_hang_up(tiny_worker, ENDLESS_BATCH)
    assert b"200 OK" in received and b'"index":0' in received
    assert_the_model_is_free_again(tiny_worker)


def test_a_pipelining_client_that_closed_stops_a_batch_before_its_next_prompt(tiny_worker: ServerProcess) -> None:
    """Each prompt of a batch would notice the closed connection at its first token, only after its
    prompt was read; the service does not start a generation for a client that has gone."""
    send_pipelined_and_close(tiny_worker, {**ENDLESS_BATCH, "stream": False})
    assert_the_model_is_free_again(tiny_worker)


@pytest.fixture(scope="module")
def hasty_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("hasty"),
                          **tiny_settings(REQUEST_TIMEOUT=1, STALL_TIMEOUT=1)) as worker:
        yield worker


def test_generation_over_request_timeout_is_a_504_and_the_worker_recovers(hasty_worker: ServerProcess) -> None:
    started = time.monotonic()
    response = requests.post(hasty_worker.url + "/v1/completions", json={**ENDLESS, "stream": False}, timeout=30)
    assert response.status_code == 504
    assert "REQUEST_TIMEOUT" in response.json()["error"]["message"]
    assert time.monotonic() - started < 5
    ok = requests.post(hasty_worker.url + "/v1/completions", json={"prompt": "w", "temperature": 0}, timeout=10)
    assert ok.json()["choices"][0]["text"] == "xyz"


def test_streamed_generation_over_request_timeout_ends_with_an_error_event(hasty_worker: ServerProcess) -> None:
    response = requests.post(hasty_worker.url + "/v1/completions", json=ENDLESS, timeout=30)
    assert response.status_code == 200  # headers were already sent when the limit struck
    last = response.text.strip().split("\n\n")[-1]
    assert last.startswith("data: ") and json.loads(last[6:])["error"]["code"] == "timeout"


def test_many_threads_on_one_worker_never_crash_it(tiny_worker: ServerProcess) -> None:
    failures: list[str] = []

    def hammer(index: int) -> None:
        session = requests.Session()
        for round_ in range(12):
            kind = (index + round_) % 3
            try:
                if kind == 0:
                    response = session.post(tiny_worker.url + "/v1/chat/completions", timeout=60, json={
                        "messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
                    ok = response.json()["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
                elif kind == 1:
                    response = session.post(tiny_worker.url + "/gpt4all_api", timeout=60,
                                            json={"prompt": "Hi", "temp": 0, "stream": True})
                    ok = response.text == TINY_CHAT_REPLY
                else:
                    response = session.post(tiny_worker.url + "/v1/embeddings", json={"input": ["a b", "c"]}, timeout=60)
                    ok = len(response.json()["data"]) == 2
                if response.status_code != 200 or not ok:
                    failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
            except requests.RequestException as error:
                failures.append(f"{kind}: {error}")

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert tiny_worker.process is not None and tiny_worker.process.poll() is None
