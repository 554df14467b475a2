"""Real processes on real loopback sockets, for end-to-end tests.

`ServerProcess` starts a command (a worker, the supervisor) with its own environment, waits until
it answers, and on teardown stops it and every process it started: a test that leaves an orphan
is a failing test, so `stop()` reports survivors.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil
import requests

from api.protocol import Sentinel, is_sentinel_name, read_sentinel
from testing.tiny_models import tiny_settings

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(**overrides: object) -> dict[str, str]:
    """The test process's environment minus our configuration keys, plus `overrides`.

    A developer's own .env must not leak into tests, so ENV_FILE points at an empty file.
    """
    from api.config import ENV_FILE_VARIABLE, FIELDS

    env = {key: value for key, value in os.environ.items() if key not in {field.key for field in FIELDS}}
    env["PYTHONUNBUFFERED"] = "1"
    env[ENV_FILE_VARIABLE] = os.devnull
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class ServerProcess:
    def __init__(self, args: list[str], env: Mapping[str, str], port: int, log_path: Path) -> None:
        self.args = args
        self.env = dict(env)
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.args, cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 30.0, path: str = "/ready",
                   accept: Callable[[int], bool] = lambda status: status == 200) -> ServerProcess:
        """Wait until this server's own worker answers `path` with a status `accept` takes.

        An answer counts only if its `X-Worker-Pid` is this process or one it started: a port
        race once let a test talk to another suite's worker on the port it thought it owned.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                response = requests.get(self.url + path, timeout=1)
                if self.answered_by_us(response) and accept(response.status_code):
                    return self
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def answered_by_us(self, response: requests.Response) -> bool:
        """True if one of our processes answered; raises if a live process of someone else's did.

        No header (the supervisor's fallback responder, or a foreign server) is not ours yet; a pid
        that has exited since it answered may have been a worker of ours that was recycled."""
        header = response.headers.get("X-Worker-Pid", "")
        if not header.isdigit():
            return False
        pid = int(header)
        if pid == self.pid or pid in {child.pid for child in self.descendants()}:
            return True
        if psutil.pid_exists(pid):
            raise RuntimeError(f"port {self.port} is answered by pid {pid}, which this server (pid {self.pid}) "
                               f"did not start: another test's server took the port")
        return False

    def wait_answering(self, timeout: float = 30.0) -> ServerProcess:
        """Wait until the server answers HTTP at all (whatever the status)."""
        return self.wait_ready(timeout, accept=lambda _status: True)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 10.0) -> list[int]:
        """Stop the server and everything it started; return pids that had to be killed late."""
        if self.process is None:
            return []
        children = self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        _, alive = psutil.wait_procs(children, timeout=5)
        for survivor in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                survivor.kill()
        if self._log:
            self._log.close()
        self.process = None
        return [survivor.pid for survivor in alive]


CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}


class Service:
    """A running supervisor (`watchdog_main.py`) with its folder, log and workers' sentinels,
    for the end-to-end tests and the benchmarks."""

    def __init__(self, process: ServerProcess, folder: Path) -> None:
        self.process = process
        self.folder = folder
        self.url = process.url
        self.port = process.port
        self.run_dir = folder / "run"
        self.log_path = folder / "logs" / "gpt4all-api.log"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.process.descendants() if is_worker(p)]

    def sentinels(self) -> dict[int, Sentinel]:
        found = {}
        for path in self.run_dir.glob("*"):
            sentinel = read_sentinel(path) if is_sentinel_name(path.name) else None
            if sentinel is not None:
                found[sentinel.pid] = sentinel
        return found

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n--- log:\n{self.log()[-4000:]}")

    def busy_worker(self, timeout: float = 10) -> int:
        """The pid of a worker whose sentinel says it is generating."""
        def generating() -> int:
            return next((pid for pid, s in self.sentinels().items() if s.generating), 0)

        return int(self.wait_for(generating, timeout, "a worker to be generating"))

    def streaming_worker(self, outcome: Mapping[str, object], timeout: float = 10) -> int:
        """The pid of the worker serving the stream that `stream_in_background` started.

        Safer than `busy_worker` once other requests have run: a worker that has just sent its
        answer may still say BUSY and generating in its sentinel for a moment."""
        return int(self.wait_for(lambda: outcome.get("pid"), timeout, "the stream's first chunk"))  # type: ignore[arg-type]

    def ready_count(self) -> int:
        return sum(1 for s in self.sentinels().values() if s.state.value == "READY")

    def chat(self, session: requests.Session | None = None, timeout: float = 15,
             body: Mapping[str, object] = CHAT) -> requests.Response:
        return (session or requests).post(self.url + "/v1/chat/completions", json=body, timeout=timeout)

    def stream_in_background(self, body: Mapping[str, object], path: str = "/v1/completions",
                             timeout: float = 30) -> tuple[threading.Thread, dict[str, object]]:
        """Start a streamed generation in a thread; the dict collects what happened."""
        outcome: dict[str, object] = {"chunks": 0}

        def run() -> None:
            try:
                with requests.post(self.url + path, json={**body, "stream": True}, stream=True,
                                   timeout=timeout) as response:
                    outcome["status"] = response.status_code
                    outcome["pid"] = response.headers.get("X-Worker-Pid")
                    for line in response.iter_lines():
                        if line.startswith(b"data: "):
                            outcome["chunks"] = int(outcome["chunks"]) + 1  # type: ignore[call-overload]
                            outcome["tail"] = [*outcome.get("tail", [])[-3:], line]  # type: ignore[misc]
                outcome["ended"] = "cleanly"
            except requests.RequestException as error:
                outcome["error"] = type(error).__name__

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, outcome

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def cmdline_text(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""


def environ_text(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(f"{key}={value}" for key, value in process.environ().items())
    return ""


def is_worker(process: psutil.Process) -> bool:
    """A spawned worker shows `--worker-id` in its command line; a forked one is named api-worker-K."""
    with contextlib.suppress(psutil.Error):
        return "--worker-id" in cmdline_text(process) or process.name().startswith("api-worker-")
    return False


def start_worker(model_dir: Path, tmp_path: Path, **settings: object) -> ServerProcess:
    """A standalone worker (`python -m api`) on a free port, serving the models in model_dir."""
    port = free_port()
    env = base_env(MODEL_PATH=model_dir, LISTEN_PORT=port, LOG_FOLDER_NAME=tmp_path / "logs",
                   WATCHDOG_TEMPFILE=tmp_path / "run", **settings)
    return ServerProcess([PYTHON, "-m", "api"], env, port, tmp_path / f"worker-{port}.log").start()


ENDLESS = {"prompt": "count 0", "max_tokens": 100000, "temperature": 0}  # digits until cancelled


FAST = {
    "HEALTH_INTERVAL": 0.5, "BOOT_TIMEOUT": 20, "STALL_TIMEOUT": 1.5, "REQUEST_TIMEOUT": 30, "KILL_TIMEOUT": 1,
    "GRACEFUL_TIMEOUT": 5, "RESTART_BACKOFF_MAX": 2,
}


@contextlib.contextmanager
def running_worker(model_dir: Path, tmp_path: Path, *, ready_timeout: float = 30.0,
                   **settings: object) -> Iterator[ServerProcess]:
    """A standalone worker, ready, for the length of the block; then stopped, and checked to have
    left no process behind."""
    worker = start_worker(model_dir, tmp_path, **settings)
    try:
        yield worker.wait_ready(timeout=ready_timeout)
    finally:
        assert worker.stop() == [], "the worker left processes behind"


def processes_naming(folder: Path) -> list[psutil.Process]:
    """Every live process whose command line or environment names `folder` (the supervisor, its
    fork server and workers all do: WATCHDOG_TEMPFILE is under it), zombies aside."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE and (
                    str(folder) in cmdline_text(process) or str(folder) in environ_text(process)):
                found.append(process)
    return found


def supervisor_env(model_dir: Path, folder: Path, port: int, **settings: object) -> dict[str, str]:
    values = {**tiny_settings(), **FAST, **settings}
    return base_env(MODEL_PATH=model_dir, LISTEN_PORT=port, WATCHDOG_TEMPFILE=folder / "run",
                    LOG_FOLDER_NAME=folder / "logs", **values)


class Worker:
    """A worker started as the supervisor starts one (`--worker-id`, an inherited listening socket,
    commands on stdin), with no supervisor: its sentinel and exit codes are the test's to read."""

    def __init__(self, model_dir: Path, folder: Path, restart_after: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sentinel_path = folder / "worker-1.json"
        env = base_env(MODEL_PATH=model_dir, WATCHDOG_TEMPFILE=folder, LOG_FOLDER_NAME=folder, **tiny_settings())
        fd = self.listener.fileno()
        self.process = subprocess.Popen(
            [PYTHON, "-m", "api", "--worker-id", "1", "--sentinel", str(self.sentinel_path), "--listen-fd", str(fd),
             "--parent-pid", str(os.getpid()), "--restart-after", str(restart_after)],
            pass_fds=(fd,), cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def sentinel(self) -> Sentinel | None:
        return read_sentinel(self.sentinel_path)

    def wait_state(self, state: str, timeout: float = 20) -> Sentinel:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sentinel = self.sentinel()
            if sentinel is not None and sentinel.state.value == state:
                return sentinel
            if self.process.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"no {state}: {self.sentinel()}, exit {self.process.poll()}, output:\n{self.output()}")

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def output(self) -> str:
        if self.process.poll() is None or self.process.stdout is None:
            return ""
        return self.process.stdout.read().decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        self.listener.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
