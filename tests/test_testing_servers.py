"""The harness's own guarantees (testing/servers.py): a test talks to the server it started."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.servers import PYTHON, ServerProcess, base_env


class _Answer(http.server.BaseHTTPRequestHandler):
    pid_header: str | None = None

    def do_GET(self) -> None:
        self.send_response(200)
        if self.pid_header is not None:
            self.send_header("X-Worker-Pid", self.pid_header)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def squatter(pid_header: str | None) -> Iterator[int]:
    """A server of someone else's on a loopback port: its port."""
    handler = type("Squatter", (_Answer,), {"pid_header": pid_header})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def idle_process(port: int, tmp_path: Path) -> Iterator[ServerProcess]:
    """A process of ours that serves nothing, believing `port` is its own."""
    process = ServerProcess([PYTHON, "-c", "import time; time.sleep(60)"], base_env(), port, tmp_path / "idle.log")
    try:
        yield process.start()
    finally:
        assert process.stop() == []


def test_a_live_stranger_answering_our_port_fails_at_once(tmp_path: Path) -> None:
    stranger = os.getpid()  # alive, and not started by the server under test
    with squatter(str(stranger)) as port, idle_process(port, tmp_path) as ours, \
            pytest.raises(RuntimeError, match=f"answered by pid {stranger}"):
        ours.wait_ready(timeout=10)


def test_an_answer_without_a_worker_pid_is_not_taken_for_ours(tmp_path: Path) -> None:
    with squatter(None) as port, idle_process(port, tmp_path) as ours, pytest.raises(TimeoutError):
        ours.wait_answering(timeout=0.2)
