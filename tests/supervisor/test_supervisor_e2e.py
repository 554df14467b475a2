"""The real supervisor (`python watchdog_main.py`) on a free loopback port with the tiny models:
restart per request, rolling restart, graceful stop, systemd notifications, logs, refusals.

The `start_service` fixture here is shared with the fault tests in tests/supervisor/test_supervisor_faults.py;
`Service` itself lives in testing/servers.py, where the benchmarks use it too. Every test ends with no
process of its service left: the fixture checks every process whose command line names the test's folder.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from testing.raw_http import EXPECT_TOO_LARGE, assert_json_refusal, raw_exchange
from testing.servers import ENDLESS, FAST, PYTHON, REPO, Service, cmdline_text, environ_text, free_port, supervisor_env
from testing.tiny_models import TINY_CHAT_REPLY

# Short limits so faults are found in about a second (the defaults suit real models).


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- restart after each request, with no gap


def test_consecutive_requests_are_served_by_different_worker_processes(start_service: Callable[..., Service]) -> None:
    service = start_service()
    session = requests.Session()  # keep-alive: a draining worker must close the connection
    pids = []
    for _ in range(8):
        response = service.chat(session)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
        assert response.headers["Connection"] == "close"
        pids.append(response.headers["X-Worker-Pid"])
    assert len(set(pids)) == 8
    service.wait_for(lambda: service.log().count("exited after serving 1 request(s)") >= 8, 10, "8 served exits")
    assert "crash" not in service.log()


def test_requests_that_do_not_touch_the_model_do_not_recycle_the_worker(start_service: Callable[..., Service]) -> None:
    service = start_service()
    session = requests.Session()
    pids = {session.get(service.url + "/v1/models", timeout=5).headers["X-Worker-Pid"] for _ in range(5)}
    assert len(pids) == 1, "the same worker answers on its keep-alive connection"
    sentinel = service.sentinels()[int(pids.pop())]
    assert sentinel.state.value == "READY" and sentinel.requests_served == 0, "it announced READY before accepting"


def test_a_hundred_back_to_back_requests_all_succeed(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=1)
    session = requests.Session()
    statuses, pids = [], set()
    for _ in range(100):
        response = service.chat(session, timeout=30)
        statuses.append(response.status_code)
        pids.add(response.headers.get("X-Worker-Pid"))
    assert statuses == [200] * 100
    assert len(pids) == 100


def test_restart_after_n_requests(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=3, WARM_SPARES=0)
    session = requests.Session()
    pids = [service.chat(session).headers["X-Worker-Pid"] for _ in range(9)]
    assert [len(set(pids[i:i + 3])) for i in (0, 3, 6)] == [1, 1, 1]
    assert len(set(pids)) == 3


# -- signals


def test_sighup_replaces_every_worker_without_refusing_a_connection(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0)
    before = {w.pid for w in service.workers()}
    results: list[object] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = service.chat(session, timeout=10)
                results.append((response.status_code, response.headers["X-Worker-Pid"]))
            except requests.RequestException as error:
                results.append(error)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        service.wait_for(lambda: len(results) >= 5, 10, "the client to be running")
        service.signal(signal.SIGHUP)
        service.wait_for(lambda: "reload complete" in service.log(), 20, "the reload to complete")
        count = len(results)
        service.wait_for(lambda: len(results) >= count + 5, 10, "more requests after the reload")
    finally:
        stop.set()
        thread.join(15)
    failures = [r for r in results if not (isinstance(r, tuple) and r[0] == 200)]
    assert failures == []
    after = {w.pid for w in service.workers()}
    assert before.isdisjoint(after)
    assert str(results[-1][1]) in {str(pid) for pid in after}  # type: ignore[index]


def test_sigterm_lets_the_request_in_flight_finish_then_exits(start_service: Callable[..., Service]) -> None:
    service = start_service(REQUEST_TIMEOUT=3, STALL_TIMEOUT=2, GRACEFUL_TIMEOUT=8, RESTART_AFTER_REQUESTS=0)
    thread, outcome = service.stream_in_background(ENDLESS)
    service.busy_worker()
    started = time.monotonic()
    service.signal(signal.SIGTERM)
    service.wait_for(lambda: refuses_connections(service.port), 3, "no new connections while stopping")
    assert service.process.process is not None
    assert service.process.process.wait(15) == 0
    thread.join(5)
    # the generation ran to REQUEST_TIMEOUT (3 s) and its error event reached the client before the exit
    assert outcome["status"] == 200 and outcome["ended"] == "cleanly", outcome
    assert any(b"REQUEST_TIMEOUT" in line for line in outcome["tail"]), outcome  # type: ignore[attr-defined]
    assert 2.5 < time.monotonic() - started < 8
    assert "stopped" in service.log()


def test_sigterm_kills_what_does_not_finish_within_the_graceful_timeout(start_service: Callable[..., Service]) -> None:
    service = start_service(REQUEST_TIMEOUT=30, STALL_TIMEOUT=20, GRACEFUL_TIMEOUT=1.5, RESTART_AFTER_REQUESTS=0)
    thread, _outcome = service.stream_in_background(ENDLESS)
    busy = service.busy_worker()
    started = time.monotonic()
    service.signal(signal.SIGTERM)
    assert service.process.process is not None
    assert service.process.process.wait(10) == 0
    assert 1.4 < time.monotonic() - started < 5
    thread.join(5)
    assert not psutil.pid_exists(busy) or psutil.Process(busy).status() == psutil.STATUS_ZOMBIE
    assert "GRACEFUL_TIMEOUT (1.5 s) is over" in service.log()


# -- service integration


def test_sd_notify_ready_watchdog_and_stopping(start_service: Callable[..., Service], tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(10)
    messages: list[str] = []
    try:
        service = start_service(wait=False, env={"NOTIFY_SOCKET": address})
        while not any("READY=1" in m for m in messages) or not any("WATCHDOG=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
        assert service.ready_count() >= 1, "READY=1 only once a worker is ready"
        assert requests.get(service.url + "/health", timeout=5).status_code == 200
        service.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
    finally:
        receiver.close()
    ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert all("READY=1" not in m for m in messages[:ready_at])
    assert not any("NOTIFY_SOCKET" in environ_text(w) for w in service.workers())


def test_logs_tag_every_worker_line_including_c_level_stderr(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, LOG_MAX_BYTES=1024 * 1024)
    response = requests.post(service.url + "/v1/completions", json={**ENDLESS, "max_tokens": 700}, timeout=30)
    assert response.status_code == 200
    pid = response.headers["X-Worker-Pid"]
    log = service.log()
    worker_lines = [line for line in log.splitlines() if f" pid {pid}] " in line]
    assert any("INFO api.worker: model tiny-chat.gguf loaded" in line for line in worker_lines)
    # the tiny model's context is 512 tokens: llama.cpp's C++ code says so on stderr, in our log
    assert any("context full, swapping" in line for line in worker_lines), log[-3000:]
    assert "[supervisor] INFO supervisor (pid" in log


def test_logs_rotate_by_size(start_service: Callable[..., Service]) -> None:
    service = start_service(LOG_MAX_BYTES=2048, LOG_BACKUPS=2)
    session = requests.Session()
    for _ in range(6):
        assert service.chat(session).status_code == 200
    service.wait_for(lambda: (service.log_path.parent / "gpt4all-api.log.1").exists(), 5, "a rotated log")
    assert not (service.log_path.parent / "gpt4all-api.log.3").exists()
    assert service.log_path.stat().st_size <= 2048 + 1024


def test_a_second_supervisor_on_the_same_pid_file_or_port_refuses_with_one_line(
        start_service: Callable[..., Service], tiny_model_dir: Path, tmp_path: Path) -> None:
    service = start_service()
    same_folder = supervisor_env(tiny_model_dir, service.folder, free_port())
    result = subprocess.run([PYTHON, "watchdog_main.py"], cwd=REPO, env=same_folder, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and f"another supervisor (pid {service.pid}) is already running" in result.stderr
    other = tmp_path / "other"
    same_port = supervisor_env(tiny_model_dir, other, service.port)
    result = subprocess.run([PYTHON, "watchdog_main.py"], cwd=REPO, env=same_port, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{service.port}" in result.stderr
    assert requests.get(service.url + "/health", timeout=5).status_code == 200, "the first one is unharmed"


def test_bad_configuration_prints_one_line_and_exits_non_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = supervisor_env(tiny_model_dir, tmp_path, free_port(), WORKERS="many")
    result = subprocess.run([PYTHON, "watchdog_main.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr == "configuration error: WORKERS='many' is invalid: expected a whole number >= 1 and <= 64\n"


@pytest.mark.parametrize("key", ["LOG_FOLDER_NAME", "WATCHDOG_TEMPFILE"])
def test_a_folder_the_service_cannot_write_in_is_a_one_line_configuration_error(
        tiny_model_dir: Path, tmp_path: Path, key: str) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    env = supervisor_env(tiny_model_dir, tmp_path, free_port())
    env[key] = str(not_a_folder / "sub")
    result = subprocess.run([PYTHON, "watchdog_main.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr == (f"configuration error: {key}='{not_a_folder / 'sub'}' is invalid: expected a folder this "
                             f"service can write in ({not_a_folder / 'sub'}: Not a directory)\n")


def test_control_stdin_stop_for_service_wrappers(start_service: Callable[..., Service]) -> None:
    service = start_service(args=("--control-stdin",))
    process = service.process.process
    assert process is not None and process.stdin is not None
    process.stdin.write(b"stop\n")
    process.stdin.flush()
    assert process.wait(15) == 0
    assert "SIGTERM: stopping" in service.log()


def test_health_of_the_service_reports_json(start_service: Callable[..., Service]) -> None:
    service = start_service()
    body = requests.get(service.url + "/health", timeout=5).json()
    assert body["status"] == "ready"
    assert json.loads(json.dumps(body))["model"] == "tiny-chat.gguf"


def test_a_supervised_worker_refuses_bad_http_in_json_too(start_service: Callable[..., Service]) -> None:
    """Supervised workers use their own waitress channel: its refusals are the same JSON errors."""
    service = start_service()
    pids = {worker.pid for worker in service.workers()}
    too_large = raw_exchange(service.port, EXPECT_TOO_LARGE)
    assert int(too_large.headers.get("x-worker-pid", 0)) in pids, too_large
    assert_json_refusal(too_large, int(too_large.headers["x-worker-pid"]), 413, "request_too_large", "MAX_REQUEST_BYTES")
    bad = raw_exchange(service.port, b"NONSENSE\r\n\r\n")
    assert int(bad.headers.get("x-worker-pid", 0)) in pids, bad
    assert_json_refusal(bad, int(bad.headers["x-worker-pid"]), 400, None, "not valid HTTP/1.1")


# -- the other way to start workers: a fresh `python -m api` each (Windows' way, and a fallback)


def test_spawned_workers_restart_per_request_and_die_with_a_killed_supervisor(
        start_service: Callable[..., Service]) -> None:
    service = start_service(WORKER_START_METHOD="spawn")
    assert "workers started by spawn" in service.log()
    session = requests.Session()
    pids = {service.chat(session).headers["X-Worker-Pid"] for _ in range(4)}
    assert len(pids) == 4
    service.wait_for(lambda: service.ready_count() == 2 and len(service.workers()) == 2, 10, "two idle workers")
    workers = service.workers()
    assert workers and all("--worker-id" in cmdline_text(worker) for worker in workers)
    os.kill(service.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(workers, timeout=2)
    assert alive == []


def test_the_supervisor_sleeps_while_nothing_happens(start_service: Callable[..., Service]) -> None:
    """Its loop wakes on sentinel writes, not on its own reads of them (inotify reports both)."""
    service = start_service()
    service.wait_for(lambda: service.ready_count() == 2, 10, "two ready workers")
    supervisor = psutil.Process(service.pid)
    before = supervisor.cpu_times()
    time.sleep(3)
    after = supervisor.cpu_times()
    assert (after.user - before.user) + (after.system - before.system) < 0.3


def test_parallel_clients_each_meet_a_fresh_worker(start_service: Callable[..., Service]) -> None:
    """Restart per request holds under concurrency: a worker takes one connection and no second
    one before that request is done, so no request is served by a worker that served another."""
    service = start_service(WARM_SPARES=3)
    service.wait_for(lambda: service.ready_count() >= 4, 20, "4 ready workers")
    body = {"prompt": "count 0", "max_tokens": 300, "temperature": 0}  # long enough to overlap

    def request(_index: int) -> str:
        response = requests.post(service.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.headers["X-Worker-Pid"]

    with ThreadPoolExecutor(8) as pool:
        pids = list(pool.map(request, range(24)))
    assert len(set(pids)) == len(pids), f"{len(pids) - len(set(pids))} request(s) met a used worker"


def test_a_silent_connection_or_an_idle_keep_alive_one_does_not_hold_off_other_clients(
        start_service: Callable[..., Service]) -> None:
    """One client at a time must not let a connection that sends nothing, or a kept-alive one
    between requests, block a worker (here the only one) for other clients."""
    service = start_service(WARM_SPARES=0, RESTART_AFTER_REQUESTS=0)
    kept_alive = requests.Session()
    assert kept_alive.get(service.url + "/v1/models", timeout=5).status_code == 200
    with socket.create_connection(("127.0.0.1", service.port)) as _silent:
        started = time.monotonic()
        response = service.chat(timeout=10)
        waited = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert waited < 5, f"a silent connection held the worker for {waited:.1f} s"
        assert service.chat(kept_alive).status_code == 200, "the kept-alive connection still works"


def test_workers_caps_the_generations_running_at_once(start_service: Callable[..., Service]) -> None:
    """WORKERS=1 with two spares: a second client reaches a spare, which waits for the one
    inference slot and generates only once the first generation is over. Waiting is not hanging."""
    service = start_service(WORKERS=1, WARM_SPARES=2, RESTART_AFTER_REQUESTS=0)
    service.wait_for(lambda: service.ready_count() >= 3, 20, "3 ready workers")
    with requests.post(service.url + "/v1/completions", json={**ENDLESS, "stream": True}, stream=True,
                       timeout=30) as first:
        lines = first.iter_lines()  # kept: a dropped iterator closes the connection
        assert any(line.startswith(b"data: ") for line in itertools.islice(lines, 3))
        busy = service.busy_worker()
        thread, second = service.stream_in_background({**ENDLESS, "max_tokens": 5})
        time.sleep(FAST["STALL_TIMEOUT"] + 1.5)  # longer than a stall would be allowed to last
        assert [pid for pid, sentinel in service.sentinels().items() if sentinel.generating] == [busy]
        assert second["chunks"] == 0 and "status" not in second, "the second client waits for the slot"
    thread.join(10)
    assert second.get("status") == 200 and second["chunks"] > 0, second
    assert "seems hung" not in service.log()
