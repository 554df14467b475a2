"""The bounded line for an inference slot (MAX_QUEUE, QUEUE_TIMEOUT, first come first served, a
client that leaves gives up its place), /ready, the deep health check and systemd's watchdog, on
the real supervisor with real generations of the tiny model.

The generations that fill the slot are ENDLESS streams (digits until cancelled); each test ends
them by closing the stream, and the fixture checks that no process is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from testing.servers import ENDLESS, Service
from testing.tiny_models import TINY_CHAT, TINY_EMBED, copy_tiny_models

SHORT = {"prompt": "count 0", "max_tokens": 40, "temperature": 0}
QUICKLY = 3.0  # seconds: what "at once" must stay under on a loaded 2-core machine (the bench measures ms)


class Endless:
    """An ENDLESS stream held open on a raw socket until `close()`: it holds an inference slot."""

    def __init__(self, service: Service) -> None:
        body = json.dumps({**ENDLESS, "stream": True}).encode()
        self.socket = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        self.socket.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def first_bytes(self) -> bytes:
        return self.socket.recv(4096)

    def close(self) -> None:
        self.socket.close()


def waiting(service: Service) -> int:
    return len(list(service.run_dir.glob("queue-*.ticket")))


def start_with_ready_workers(start_service: Callable[..., Service], **settings: object) -> Service:
    """A service with WORKERS=1 and every worker READY."""
    service = start_service(WORKERS=1, **settings)
    expected = 1 + int(settings.get("WARM_SPARES", 1))  # type: ignore[call-overload]
    service.wait_for(lambda: service.ready_count() == expected, 20, f"{expected} ready workers")
    return service


@contextlib.contextmanager
def slot_held(service: Service, waiters: int = 0) -> Iterator[None]:
    """For the block: an ENDLESS stream generating (the one slot taken) and `waiters` more in line."""
    streams = [Endless(service)]
    try:
        assert streams[0].first_bytes().startswith(b"HTTP/1.1 200")
        for count in range(1, waiters + 1):
            streams.append(Endless(service))
            service.wait_for(lambda count=count: waiting(service) == count, 10, f"{count} stream(s) waiting in line")
        yield
    finally:
        for stream in streams:
            stream.close()


def post_in_background(url: str, body: dict[str, object], results: dict[str, object], name: str,
                       path: str = "/v1/completions") -> threading.Thread:
    def run() -> None:
        response = requests.post(url + path, json=body, timeout=60)
        results[name] = (response.status_code, time.monotonic(), response.headers.get("X-Worker-Pid"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def timed_post(service: Service, path: str, body: dict[str, object]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.post(service.url + path, json=body, timeout=30)
    return response, time.monotonic() - started


def test_a_full_line_is_a_503_with_retry_after_at_once_in_each_interfaces_shape(
        start_service: Callable[..., Service]) -> None:
    service = start_with_ready_workers(start_service, WARM_SPARES=3, RESTART_AFTER_REQUESTS=0, MAX_QUEUE=1)
    with slot_held(service, waiters=1):
        response, seconds = timed_post(service, "/v1/completions", SHORT)
        assert response.status_code == 503 and seconds < QUICKLY, (response.status_code, seconds)
        assert response.json()["error"]["code"] == "queue_full"
        assert int(response.headers["Retry-After"]) >= 1
        assert "MAX_QUEUE is 1" in response.json()["error"]["message"]
        anthropic, _ = timed_post(service, "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        assert anthropic.status_code == 503 and anthropic.json()["error"]["type"] == "overloaded_error", anthropic.text
        ollama, _ = timed_post(service, "/api/generate", {"model": TINY_CHAT, "prompt": "count 0", "stream": False})
        assert ollama.status_code == 503 and set(ollama.json()) == {"error"}, ollama.text
        ready = requests.get(service.url + "/ready", timeout=10)
        assert ready.status_code == 503 and "at capacity" in ready.json()["reason"] and ready.json()["waiting"] == 1
        assert requests.get(service.url + "/health", timeout=10).status_code == 200, "alive while at capacity"
        assert waiting(service) == 1, "the refused requests took no place"
    service.wait_for(lambda: requests.get(service.url + "/ready", timeout=10).status_code == 200, 20, "ready again")


def test_past_what_the_workers_can_hold_the_supervisor_answers_newcomers_at_once(
        start_service: Callable[..., Service]) -> None:
    """Every worker is generating or holds a waiting client: a newcomer would sit in the kernel's
    accept queue, where no worker looks. The supervisor's fallback answers it instead."""
    service = start_with_ready_workers(start_service, WARM_SPARES=1, RESTART_AFTER_REQUESTS=0, MAX_QUEUE=5)
    with slot_held(service, waiters=1):
        response, seconds = timed_post(service, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and seconds < QUICKLY, (response.status_code, seconds)
        assert response.headers["Server"] == "gpt4all-api-supervisor"
        assert response.json()["error"]["code"] == "queue_full" and int(response.headers["Retry-After"]) >= 1
        ready = requests.get(service.url + "/ready", timeout=10)
        assert ready.status_code == 503 and "at capacity" in ready.json()["reason"]
        assert requests.get(service.url + "/health", timeout=10).json()["status"] == "live"
    service.wait_for(lambda: service.chat().status_code == 200, 20, "served again")
    assert "overloaded: newcomers get 503" in service.log() and "no longer overloaded" in service.log()


def test_queue_timeout_gives_a_503_after_that_long(start_service: Callable[..., Service]) -> None:
    service = start_with_ready_workers(start_service, WARM_SPARES=1, RESTART_AFTER_REQUESTS=0, MAX_QUEUE=2,
                                       QUEUE_TIMEOUT=1.5)
    with slot_held(service):
        response, seconds = timed_post(service, "/v1/completions", SHORT)
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout", response.text
        assert 1.4 <= seconds < 1.5 + QUICKLY, seconds
        assert "QUEUE_TIMEOUT (1.5 s)" in response.json()["error"]["message"]
        assert waiting(service) == 0


def test_a_client_that_leaves_gives_up_its_place_at_once_and_the_line_is_first_come_first_served(
        start_service: Callable[..., Service]) -> None:
    service = start_with_ready_workers(start_service, WARM_SPARES=3, RESTART_AFTER_REQUESTS=0, MAX_QUEUE=2)
    running = Endless(service)
    results: dict[str, object] = {}
    try:
        assert running.first_bytes().startswith(b"HTTP/1.1 200")
        leaver = Endless(service)  # waits in line, then hangs up
        service.wait_for(lambda: waiting(service) == 1, 10, "the leaver in line")
        first = post_in_background(service.url, SHORT, results, "first")
        service.wait_for(lambda: waiting(service) == 2, 10, "the first in line behind it")
        assert requests.post(service.url + "/v1/completions", json=SHORT, timeout=30).status_code == 503, "full"
        left_at = time.monotonic()
        leaver.close()
        service.wait_for(lambda: waiting(service) == 1, 2, "the leaver's place given up")
        assert time.monotonic() - left_at < 1.0, "at once, not when it would have reached the slot"
        second = post_in_background(service.url, SHORT, results, "second")  # takes the freed place
        service.wait_for(lambda: waiting(service) == 2, 10, "the second in line")
    finally:
        running.close()  # the slot comes free: the line moves
    first.join(60)
    second.join(60)
    assert results["first"][0] == 200 and results["second"][0] == 200, results  # type: ignore[index]
    assert results["first"][1] < results["second"][1], "first come, first served"  # type: ignore[index]


def test_ready_follows_a_frozen_generation_and_the_recovery(start_service: Callable[..., Service]) -> None:
    service = start_with_ready_workers(start_service, WARM_SPARES=1, MAX_QUEUE=0)
    assert requests.get(service.url + "/ready", timeout=10).status_code == 200
    with slot_held(service):
        pid = service.busy_worker()
        os.kill(pid, signal.SIGSTOP)
        ready = requests.get(service.url + "/ready", timeout=10)  # a spare answers: the slot is held
        assert ready.status_code == 503 and "at capacity" in ready.json()["reason"], ready.text
        service.wait_for(lambda: requests.get(service.url + "/ready", timeout=10).status_code == 200, 20,
                         "ready once the frozen worker is gone")
        assert f"(pid {pid}) seems hung" in service.log()


def test_ready_says_why_while_the_model_cannot_load_and_health_stays_live(
        start_service: Callable[..., Service], tmp_path: Path, tiny_model_dir: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model_dir / TINY_EMBED, models / TINY_EMBED)
    (models / TINY_CHAT).write_bytes(os.urandom(4096))
    service = start_service(wait=False, model_dir=models)

    def not_ready() -> list[requests.Response]:  # (a 503 response is falsy itself)
        try:
            response = requests.get(service.url + "/ready", timeout=5)
        except requests.ConnectionError:
            return []
        return [response] if response.status_code == 503 and "could not be loaded" in response.text else []

    [response] = service.wait_for(not_ready, 20, "/ready saying the model cannot load")  # type: ignore[misc]
    assert int(response.headers["Retry-After"]) >= 1
    health = requests.get(service.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "live" and health.json()["ready"] is False


def test_ready_is_not_200_once_a_graceful_stop_began_and_waiters_get_a_503_at_once(
        start_service: Callable[..., Service]) -> None:
    service = start_with_ready_workers(start_service, GRACEFUL_TIMEOUT=10, MAX_QUEUE=2, WARM_SPARES=2,
                                       RESTART_AFTER_REQUESTS=0)
    results: dict[str, object] = {}
    with slot_held(service):
        waiter = post_in_background(service.url, SHORT, results, "waiter")
        service.wait_for(lambda: waiting(service) == 1, 10, "a request waiting in line")
        stopped_at = time.monotonic()
        service.signal(signal.SIGTERM)
        waiter.join(10)
        assert results["waiter"][0] == 503, results  # type: ignore[index]
        assert results["waiter"][1] - stopped_at < QUICKLY, "told at once, not cut off at GRACEFUL_TIMEOUT"  # type: ignore[index]

        def refused_or_503() -> bool:
            try:
                return requests.get(service.url + "/ready", timeout=2).status_code == 503
            except requests.ConnectionError:
                return True

        service.wait_for(refused_or_503, 5, "/ready refusing once the stop began")


def test_the_deep_check_generates_a_token_needs_the_key_and_counts_as_a_request(
        start_service: Callable[..., Service]) -> None:
    service = start_service(API_KEY="k", MAX_QUEUE=0)
    assert requests.get(service.url + "/health?deep=1", timeout=10).status_code == 401
    assert requests.get(service.url + "/health", timeout=10).status_code == 200, "the plain check stays open"
    response = requests.get(service.url + "/health?deep=1", headers={"X-Api-Key": "k"}, timeout=20)
    assert response.status_code == 200 and response.json()["deep"]["tokens"] == 1, response.text
    pid = int(response.headers["X-Worker-Pid"])
    service.wait_for(lambda: pid not in service.sentinels(), 10, "the worker that ran it replaced")
    running = Endless(service)  # the key is needed here too
    try:
        head = running.first_bytes()
        assert head.startswith(b"HTTP/1.1 401")
    finally:
        running.close()


def test_the_deep_check_fails_fast_while_every_slot_is_busy(start_service: Callable[..., Service]) -> None:
    service = start_with_ready_workers(start_service, WARM_SPARES=1, MAX_QUEUE=0)
    with slot_held(service):
        started = time.monotonic()
        response = requests.get(service.url + "/health?deep=1", timeout=20)
        assert response.status_code == 503 and time.monotonic() - started < QUICKLY
        assert response.json()["reason"].startswith("the deep check failed: The server is at capacity")


# -- systemd's watchdog, on a real notify socket


class NotifySocket:
    def __init__(self, folder: Path) -> None:
        self.address = str(folder / "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.address)
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def read_for(self, seconds: float) -> list[str]:
        """The messages received within `seconds` from now."""
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(self.socket.recv(4096).decode())
            except TimeoutError:
                continue
        return got

    def close(self) -> None:
        self.socket.close()


def pings(messages: list[str]) -> int:
    return sum(1 for message in messages if "WATCHDOG=1" in message)


def test_watchdog_pings_stop_while_no_worker_can_come_back_after_serving_and_resume(
        start_service: Callable[..., Service], tmp_path: Path, tiny_model_dir: Path) -> None:
    models = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    notify = NotifySocket(tmp_path)
    try:
        service = start_service(model_dir=models, WARM_SPARES=0, BOOT_TIMEOUT=2, RESTART_BACKOFF_MAX=1, KILL_TIMEOUT=1,
                                env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})
        assert pings(notify.read_for(1.5)) >= 2, "pings while nothing was served yet"
        assert service.chat().status_code == 200
        # the client has its answer before the worker records it: killing the worker in between
        # would leave the supervisor no way to know the service served (its precondition here)
        service.wait_for(lambda: "exited after serving 1 request(s)" in service.log(), 10, "the served worker's exit")
        shutil.copy(models / TINY_CHAT, tmp_path / "good.gguf")
        (tmp_path / "broken.gguf").write_bytes(os.urandom(4096))
        os.rename(tmp_path / "broken.gguf", models / TINY_CHAT)  # by rename: a running worker keeps its mapping
        for worker in service.workers():
            worker.kill()
        quiet = [message for message in notify.read_for(8) if "WATCHDOG=1" in message or "unhealthy" in message]
        assert any("STATUS=unhealthy: no worker has been up" in message for message in quiet), quiet
        assert pings(quiet[-3:]) == 0, "no pings once no worker came back for longer than a load and a backoff"
        assert "withholding systemd's WATCHDOG=1" in service.log()
        os.rename(tmp_path / "good.gguf", models / TINY_CHAT)
        assert pings(notify.read_for(6)) >= 1, "pings resume once a worker is up again"
        assert "healthy again: WATCHDOG=1 resumes" in service.log()
    finally:
        notify.close()


@pytest.mark.parametrize("max_queue", ["-1", "x"])
def test_a_bad_max_queue_is_refused_with_one_line(max_queue: str, tmp_path: Path) -> None:
    from api.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="MAX_QUEUE"):
        load_settings({"MAX_QUEUE": max_queue}, env_file=Path(os.devnull))
