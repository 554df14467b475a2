"""The supervisor's small parts in-process: sd_notify, the pid file lock, the accept gate, the 503
fallback, the log writer, the wake-up socket pair."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from api.accept_gate import AcceptGate
from api.access import AccessPolicy
from api.config import load_settings
from supervisor.fallback import FallbackResponder
from supervisor.logs import LogFileHandler, LogWriter, TaggedFormatter
from supervisor.main import Waker
from supervisor.notify import SystemdNotifier
from supervisor.pidfile import AlreadyRunning, PidFile
from testing.servers import start_worker
from testing.tiny_models import tiny_settings


def test_notify_sends_datagrams_to_a_path_and_to_the_abstract_namespace(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify.sock"), f"@gpt4all-api-test-{os.getpid()}"):
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        receiver.settimeout(2)
        try:
            notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
            notifier("READY=1\nSTATUS=serving")
            assert receiver.recv(100) == b"READY=1\nSTATUS=serving"
            notifier.close()
        finally:
            receiver.close()


def test_notify_is_silent_without_systemd_and_reads_the_watchdog_interval() -> None:
    SystemdNotifier({})("READY=1")  # no socket: nothing happens
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert SystemdNotifier({"WATCHDOG_USEC": "nonsense"}).watchdog_interval is None


def test_pid_file_is_locked_while_held_and_free_after_the_holder_dies(tmp_path: Path) -> None:
    first = PidFile(tmp_path)
    first.acquire()
    assert first.path.read_text() == f"{os.getpid()}\n"
    # another process cannot take it (flock is per open file, so a second process is the honest test)
    probe = f"from pathlib import Path; from supervisor.pidfile import PidFile; PidFile(Path(r'{tmp_path}')).acquire()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode != 0 and f"another supervisor (pid {os.getpid()}) is already running" in result.stderr
    first.release()
    assert not first.path.exists()
    # a stale file left by a killed supervisor does not block: the lock died with it
    first.path.write_text("99999\n")
    second = PidFile(tmp_path)
    second.acquire()
    assert second.path.read_text() == f"{os.getpid()}\n"
    second.release()


@pytest.mark.skipif(sys.platform == "win32", reason="the gate never closes on Windows")
def test_accept_gate_holds_a_loaded_worker_while_closed_and_cannot_close_while_a_worker_is_through(
        tmp_path: Path) -> None:
    gate = AcceptGate(tmp_path)
    assert gate.close(), "no worker holds it"
    # a worker process (flock is per open file: another process is the honest test)
    worker = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from api.accept_gate import AcceptGate; "
                               f"AcceptGate(Path(r'{tmp_path}')).wait_until_open(); print('through', flush=True); "
                               f"input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        time.sleep(1)
        assert worker.poll() is None and not _has_output(worker), "it waits at the closed gate"
        gate.open()
        assert worker.stdout is not None and worker.stdout.readline() == "through\n"
        assert not gate.close(), "a worker that passed holds the gate open: it may be accepting"
        worker.kill()
        worker.wait(5)
        assert gate.close(), "its lock died with it"
        assert gate.close(), "closing a closed gate is harmless"
    finally:
        worker.kill()
        worker.wait(5)
        gate.open()


def _has_output(process: subprocess.Popen[str]) -> bool:
    return bool(select.select([process.stdout], [], [], 0)[0])


def test_already_running_message_is_one_sentence(tmp_path: Path) -> None:
    message = str(AlreadyRunning(tmp_path / "supervisor.pid", "123"))
    assert "\n" not in message and message.startswith("another supervisor (pid 123) is already running")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def test_fallback_answers_503_json_with_retry_after_only_while_enabled(listener: socket.socket) -> None:
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    fallback = FallbackResponder(listener, AccessPolicy("", ()))
    try:
        fallback.enable("No worker can serve requests right now: the model is broken.", 7)
        response = requests.post(url + "/v1/chat/completions", json={"messages": []}, timeout=5)
        assert response.status_code == 503 and response.headers["Retry-After"] == "7"
        assert response.json() == {"error": {"message": "No worker can serve requests right now: the model is broken.",
                                             "type": "server_error", "param": None, "code": "service_unavailable"}}
        fallback.disable()
        with pytest.raises(requests.Timeout):  # disabled: nobody accepts, the client waits in the backlog
            requests.get(url + "/health", timeout=0.5)
        assert fallback.answered == 1
    finally:
        fallback.close()


ACCESS = {"API_KEY": "k3y", "AUTHORIZED_URLS": "127.0.0.1", "DOCS_PUBLIC": "true"}
# Raw requests where a second implementation of the access rules could differ from the workers'.
RAW_REQUESTS = {
    "no key": b"GET /v1/models HTTP/1.1\r\n",
    "the key": b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer k3y\r\n",
    "lower-case bearer, padded": b"GET /v1/models HTTP/1.1\r\nauthorization: bearer   k3y  \r\n",
    "X-Api-Key in capitals": b"GET /v1/models HTTP/1.1\r\nX-API-KEY: k3y\r\n",
    "an underscore header": b"GET /v1/models HTTP/1.1\r\nX_Api_Key: k3y\r\n",
    "the key twice": b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer k3y\r\nAuthorization: Bearer k3y\r\n",
    "a wrong key with a body": b"POST /v1/chat/completions HTTP/1.1\r\nX-Api-Key: no\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "health with a query": b"GET /health?probe=1 HTTP/1.1\r\n",
    "the deep health check without a key": b"GET /health?deep=1 HTTP/1.1\r\n",
    "health percent-encoded": b"GET /v1/%68ealth HTTP/1.1\r\n",
    "health in absolute form": b"GET http://127.0.0.1/check HTTP/1.1\r\n",
    "public docs": b"GET /openapi.json HTTP/1.1\r\n",
    "an unknown route": b"GET /nope HTTP/1.1\r\n",
}


def raw_exchange(port: int, request: bytes, client: str) -> tuple[int, object, str | None]:
    """Send `request` from the loopback address `client`; (status, JSON body of a refusal or None,
    its WWW-Authenticate header or None)."""
    head, _, body = request.partition(b"\r\n\r\n")
    head = head.removesuffix(b"\r\n") + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(client, 0)) as connection:
        connection.sendall(head + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n" + body)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    status = int(status_line.split()[1])
    head, _, body = rest.partition(b"\r\n\r\n")
    challenge = next((line.partition(b":")[2].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"www-authenticate:")), None)
    return status, json.loads(body) if status in (401, 403, 503) else None, challenge


REFUSED_WITHOUT_A_VALID_KEY = {"no key", "an underscore header", "the key twice", "a wrong key with a body",
                               "an unknown route", "the deep health check without a key"}
ALIVE = {"health with a query"}  # the fallback's /health: the service is alive (its supervisor runs)


@pytest.mark.parametrize(("client", "refused"), [("127.0.0.1", REFUSED_WITHOUT_A_VALID_KEY),
                                                 ("127.0.0.2", set(RAW_REQUESTS))], ids=["listed", "unlisted"])
def test_fallback_refuses_exactly_whom_a_worker_refuses_with_the_same_answer(
        tiny_model_dir: Path, tmp_path: Path, listener: socket.socket, client: str, refused: set[str]) -> None:
    worker = start_worker(tiny_model_dir, tmp_path, **tiny_settings(**ACCESS)).wait_ready()
    fallback = FallbackResponder(listener, AccessPolicy.from_settings(load_settings(ACCESS, env_file=Path(os.devnull))))
    try:
        fallback.enable("No worker can serve requests right now: testing.", 1)
        from_the_worker = {case: raw_exchange(worker.port, request, client) for case, request in RAW_REQUESTS.items()}
        from_the_fallback = {case: raw_exchange(listener.getsockname()[1], request, client)
                             for case, request in RAW_REQUESTS.items()}
    finally:
        fallback.close()
        assert worker.stop() == []
    assert {case for case, (status, _, _) in from_the_worker.items() if status in (401, 403)} == refused
    assert all(challenge == ("Bearer" if status == 401 else None) for status, _, challenge in from_the_worker.values())
    for case in RAW_REQUESTS:
        answered = (200, None, None) if case in ALIVE else (503, from_the_fallback[case][1], None)
        expected = from_the_worker[case] if case in refused else answered
        assert from_the_fallback[case] == expected, case


def test_the_supervisor_imports_no_flask_waitress_or_gpt4all() -> None:
    """Nothing a model or the web stack does may take the supervisor down (the fallback shares
    api/access.py with the workers, so this guards that module's imports too)."""
    probe = ("import sys, supervisor.main, supervisor.fallback, supervisor.arbiter, supervisor.logs; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'flask', 'werkzeug', 'waitress', 'gpt4all'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "[]"


def test_log_writer_tags_worker_lines_splits_long_ones_and_rotates(tmp_path: Path) -> None:
    console = io.StringIO()
    writer = LogWriter(tmp_path, max_bytes=4096, backups=2, console=console).start()
    logger = logging.getLogger("supervisor.test")
    try:
        logger.info("worker %d crashed", 3)
        read_end, write_end = os.pipe()
        done = threading.Event()
        writer.follow(os.fdopen(read_end, "rb"), "worker 3 pid 42", on_eof=done.set)
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(b"INFO api.worker: ready\nllama.cpp: no newline at the end")
        assert done.wait(5)
        for index in range(100):
            logger.info("filler line %d", index)
    finally:
        writer.stop()
    text = "".join(path.read_text() for path in sorted(tmp_path.glob("gpt4all-api.log*")))
    assert "[supervisor] INFO worker 3 crashed" in console.getvalue()
    assert "[worker 3 pid 42] INFO api.worker: ready" in console.getvalue()
    assert "[worker 3 pid 42] llama.cpp: no newline at the end" in console.getvalue()
    assert (tmp_path / "gpt4all-api.log.1").exists() and not (tmp_path / "gpt4all-api.log.3").exists()
    assert "filler line 99" in text


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a file whose writes fail with ENOSPC")
def test_a_log_file_that_cannot_be_written_warns_the_console_once_and_counts_what_it_dropped() -> None:
    console = io.StringIO()
    console_handler = logging.StreamHandler(console)
    handler = LogFileHandler(Path("/dev/full"), max_bytes=4096, backups=2, tell=console_handler.handle)
    handler.setFormatter(TaggedFormatter())
    try:
        for index in range(500):
            handler.handle(logging.LogRecord("supervisor", logging.INFO, "", 0, "record %d", (index,), None))
    finally:
        handler.close()
    lines = console.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "cannot write the log file /dev/full: [Errno 28] No space left on device. The service goes on" in lines[0]
    assert "500 log record(s) could not be written to the log file /dev/full" in lines[1]


def test_waker_wakes_a_waiting_loop_at_once_and_is_safe_to_call_often() -> None:
    waker = Waker()
    try:
        started = time.monotonic()
        threading.Timer(0.05, waker.wake).start()
        waker.wait(5)
        assert time.monotonic() - started < 1
        for _ in range(100000):  # more than the socket buffer holds: wake() never blocks
            waker.wake()
        waker.wait(0)
        started = time.monotonic()
        waker.wait(0.1)
        assert time.monotonic() - started >= 0.09, "drained: no stale wake-ups left"
    finally:
        waker.close()
