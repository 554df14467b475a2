"""One real supervised worker (`python -m api --worker-id ...`) driven by the test as its
supervisor: a listening socket handed over, commands on stdin, the sentinel file, exit codes."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from api.protocol import EXIT_DRAINED, EXIT_MODEL_LOAD_FAILED, EXIT_ORPHANED, EXIT_SERVED, EXIT_STOPPED
from testing.tiny_models import TINY_CHAT, TINY_EMBED

CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}


def test_ready_worker_serves_and_the_control_port_answers_health(supervised_worker) -> None:  # type: ignore[no-untyped-def]
    worker = supervised_worker(restart_after=0)
    sentinel = worker.wait_state("READY")
    assert sentinel.pid == worker.process.pid and sentinel.control_port
    assert requests.get(f"http://127.0.0.1:{sentinel.control_port}/health", timeout=5).json()["status"] == "ready"
    response = requests.post(worker.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert response.status_code == 200 and response.headers["X-Worker-Pid"] == str(worker.process.pid)
    sentinel = worker.wait_state("READY")  # reported just after the response went out
    deadline = time.monotonic() + 5
    while sentinel.requests_served != 1 and time.monotonic() < deadline:
        sentinel = worker.wait_state("READY")
    assert sentinel.requests_served == 1 and not sentinel.generating


def test_after_its_last_request_the_worker_closes_the_connection_and_exits_served(supervised_worker) -> None:  # type: ignore[no-untyped-def]
    worker = supervised_worker(restart_after=2)
    worker.wait_state("READY")
    session = requests.Session()
    first = session.post(worker.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert "Connection" not in first.headers, "keep-alive until its last request"
    second = session.post(worker.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert second.headers["Connection"] == "close"
    assert worker.process.wait(5) == EXIT_SERVED
    assert worker.sentinel().state.value == "DRAINING"  # type: ignore[union-attr]
    assert worker.sentinel().requests_served == 2  # type: ignore[union-attr]


def test_the_inferences_of_one_request_count_as_one_request(supervised_worker) -> None:  # type: ignore[no-untyped-def]
    """A batch runs one inference per prompt, each reported with the request it belongs to (the
    waitress task, handed over in the WSGI environ): the worker counts one request and stays."""
    worker = supervised_worker(restart_after=2)
    worker.wait_state("READY")
    batch = requests.post(worker.url + "/v1/completions", json={"prompt": ["w", "0"], "max_tokens": 5, "temperature": 0},
                          timeout=10)
    assert batch.status_code == 200 and len(batch.json()["choices"]) == 2
    deadline = time.monotonic() + 5
    sentinel = worker.wait_state("READY")
    while sentinel.requests_served != 1 and time.monotonic() < deadline:
        sentinel = worker.wait_state("READY")
    assert sentinel.requests_served == 1 and sentinel.inferences == 2
    assert worker.process.poll() is None, "one request of RESTART_AFTER_REQUESTS=2: the worker stays"


def test_drain_closes_idle_keep_alive_connections_and_exits(supervised_worker) -> None:  # type: ignore[no-untyped-def]
    worker = supervised_worker(restart_after=0)
    worker.wait_state("READY")
    session = requests.Session()
    assert session.get(worker.url + "/v1/models", timeout=5).status_code == 200  # an idle keep-alive connection
    worker.send("drain its memory is too big")
    assert worker.process.wait(5) == EXIT_DRAINED
    assert worker.sentinel().reason == "its memory is too big"  # type: ignore[union-attr]


def test_stop_stops_listening_and_exits_zero(supervised_worker) -> None:  # type: ignore[no-untyped-def]
    worker = supervised_worker(restart_after=0)
    worker.wait_state("READY")
    worker.send("stop")
    assert worker.process.wait(5) == EXIT_STOPPED


def test_end_of_stdin_means_the_supervisor_is_gone(supervised_worker) -> None:  # type: ignore[no-untyped-def]
    worker = supervised_worker(restart_after=0)
    worker.wait_state("READY")
    assert worker.process.stdin is not None
    worker.process.stdin.close()
    assert worker.process.wait(5) == EXIT_ORPHANED
    assert "the supervisor is gone" in worker.output()


def test_a_model_that_cannot_load_exits_with_its_reason(supervised_worker, tmp_path: Path, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "broken"
    models.mkdir()
    (models / TINY_CHAT).write_bytes(b"not a model at all" * 100)
    (models / TINY_EMBED).write_bytes((tiny_model_dir / TINY_EMBED).read_bytes())
    worker = supervised_worker(model_dir=models)
    assert worker.process.wait(20) == EXIT_MODEL_LOAD_FAILED
    sentinel = worker.sentinel()
    assert sentinel is not None and sentinel.state.value == "BOOTING" and "could not be loaded" in sentinel.reason
