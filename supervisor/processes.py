"""Real worker processes: spawn `python -m api` with the shared socket, signal and measure them.

POSIX: the listening socket's descriptor is inherited (`pass_fds`) and its number passed as
`--listen-fd`. Windows: the worker gets `--listen-share` and reads `socket.share(pid)` bytes from
the first line of its stdin; it joins a kill-on-close Job Object and a process group of its own.
Either way stdin stays a pipe for commands (end of file: the supervisor is gone) and stdout and
stderr are one pipe read by the log writer.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil

from api.config import PROJECT_ROOT
from api.protocol import Sentinel, read_sentinel, sentinel_path
from supervisor.arbiter import WorkerSpec
from supervisor.logs import LogWriter
from supervisor.notify import SYSTEMD_VARIABLES

IS_WINDOWS = os.name == "nt"


def probe_health(port: int, timeout: float) -> bool:
    """True if the worker answers HTTP on its control port at all (any status: it is alive)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class WorkerProcess:
    """One spawned worker (the arbiter's ChildProcess)."""

    def __init__(self, popen: subprocess.Popen[bytes], sentinel: Path, probes: ThreadPoolExecutor) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.sentinel_path = sentinel
        self._probes = probes

    def poll(self) -> int | None:
        return self.popen.poll()

    def send(self, line: str) -> None:
        stdin = self.popen.stdin
        if stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):  # it is gone; the reaper will see
            stdin.write(line.encode() + b"\n")
            stdin.flush()

    def _tree(self) -> list[psutil.Process]:
        try:
            parent = psutil.Process(self.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return []

    def _signal_tree(self, signals: tuple[int, ...]) -> None:
        """Signal the worker, every descendant, and its process group (which also holds
        descendants already orphaned)."""
        tree = self._tree()
        for signum in signals:
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signum)
            if not IS_WINDOWS:
                with contextlib.suppress(OSError):
                    os.killpg(self.pid, signum)

    def terminate(self) -> None:
        if IS_WINDOWS:
            self._signal_tree((signal.SIGTERM,))  # psutil: TerminateProcess
        else:
            self._signal_tree((signal.SIGTERM, signal.SIGCONT))  # a stopped process acts on TERM once continued

    def kill(self) -> None:
        self._signal_tree((signal.SIGKILL if not IS_WINDOWS else signal.SIGTERM,))

    def read_sentinel(self) -> Sentinel | None:
        return read_sentinel(self.sentinel_path)

    def memory_uss(self) -> int | None:
        try:
            return psutil.Process(self.pid).memory_full_info().uss
        except (psutil.Error, AttributeError):
            return None

    def probe(self, port: int, timeout: float) -> Future[bool]:
        return self._probes.submit(probe_health, port, timeout)

    def close(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        with contextlib.suppress(OSError):
            self.sentinel_path.unlink()


class RealProcessOps:
    """Spawns workers on the shared listening socket (the arbiter's ProcessOps)."""

    def __init__(self, listener: socket.socket, run_dir: Path, logs: LogWriter, *,
                 on_exit: Callable[[], None] = lambda: None, python: str = sys.executable) -> None:
        self.listener = listener
        self.run_dir = run_dir
        self.logs = logs
        self.on_exit = on_exit
        self.python = python
        self.probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")
        self.job = None
        if IS_WINDOWS:
            from supervisor.windows import KillOnCloseJob

            self.job = KillOnCloseJob()

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in SYSTEMD_VARIABLES}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        sentinel = sentinel_path(self.run_dir, spec.worker_id)
        with contextlib.suppress(OSError):
            sentinel.unlink()
        command = [self.python, "-m", "api", "--worker-id", str(spec.worker_id), "--sentinel", str(sentinel),
                   "--parent-pid", str(os.getpid()), "--restart-after", str(spec.restart_after)]
        options: dict[str, object] = {
            "stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
            "cwd": PROJECT_ROOT, "env": self.environment(),
        }
        if IS_WINDOWS:
            from supervisor.windows import CREATE_NEW_PROCESS_GROUP

            popen = subprocess.Popen([*command, "--listen-share"], creationflags=CREATE_NEW_PROCESS_GROUP, **options)  # type: ignore[call-overload]
            assert self.job is not None and popen.stdin is not None
            self.job.assign(popen)
            popen.stdin.write(base64.b64encode(self.listener.share(popen.pid)) + b"\n")
            popen.stdin.flush()
        else:
            # Its own process group: signals meant for the supervisor's group (Ctrl+C, `timeout`,
            # `kill -- -PGID`) reach the supervisor only, which then stops the workers gracefully.
            fd = self.listener.fileno()
            popen = subprocess.Popen([*command, "--listen-fd", str(fd)], pass_fds=(fd,), process_group=0,  # type: ignore[call-overload]
                                     **options)
        assert popen.stdout is not None
        self.logs.follow(popen.stdout, f"worker {spec.worker_id} pid {popen.pid}", on_eof=self.on_exit)
        return WorkerProcess(popen, sentinel, self.probes)

    def close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()

    def close(self) -> None:
        self.probes.shutdown(wait=False, cancel_futures=True)
