"""Real worker processes: start them on the shared socket, signal and measure them.

Two ways to start a worker (WORKER_START_METHOD):
- spawn: `python -m api` as a fresh process. POSIX: the listening socket's descriptor is inherited
  (`pass_fds`) and its number passed as `--listen-fd`. Windows: the worker gets `--listen-share`
  and reads `socket.share(pid)` bytes from the first line of its stdin; it joins a kill-on-close
  Job Object and a process group of its own. stdin stays a pipe for commands (end of file: the
  supervisor is gone); stdout and stderr are one pipe read by the log writer.
- forkserver (Linux): multiprocessing's fork server, started by the supervisor with api.worker
  preloaded, forks each worker, so a restart costs a fork and a model load instead of an
  interpreter start and ~0.25 s of imports. The socket and two socket pairs (output, commands)
  are passed to the child; the fork server relays its exit code. The supervisor itself still
  never imports the worker or gpt4all.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import multiprocessing
import multiprocessing.context
import multiprocessing.process
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
    """One started worker (the arbiter's ChildProcess); subclasses say how it was started."""

    pid: int

    def __init__(self, pid: int, sentinel: Path, probes: ThreadPoolExecutor) -> None:
        self.pid = pid
        self.sentinel_path = sentinel
        self._probes = probes

    def poll(self) -> int | None:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # it is gone; the reaper will see
            self._write(line.encode() + b"\n")

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
        with contextlib.suppress(OSError):
            self.sentinel_path.unlink()


class SpawnedWorker(WorkerProcess):
    def __init__(self, popen: subprocess.Popen[bytes], sentinel: Path, probes: ThreadPoolExecutor) -> None:
        super().__init__(popen.pid, sentinel, probes)
        self.popen = popen

    def poll(self) -> int | None:
        return self.popen.poll()

    def _write(self, data: bytes) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(data)
        self.popen.stdin.flush()

    def close(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        super().close()


class ForkedWorker(WorkerProcess):
    def __init__(self, process: multiprocessing.process.BaseProcess, commands: socket.socket, sentinel: Path,
                 probes: ThreadPoolExecutor) -> None:
        assert process.pid is not None
        super().__init__(process.pid, sentinel, probes)
        self.process = process
        self.commands = commands

    def poll(self) -> int | None:
        return self.process.exitcode  # relayed by the fork server, which reaped it

    def _write(self, data: bytes) -> None:
        self.commands.sendall(data)

    def close(self) -> None:
        self.commands.close()
        with contextlib.suppress(ValueError):
            self.process.close()
        super().close()


def fork_server_available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


class RealProcessOps:
    """Starts workers on the shared listening socket (the arbiter's ProcessOps)."""

    def __init__(self, listener: socket.socket, run_dir: Path, logs: LogWriter, *, method: str = "auto",
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
        self.method = "forkserver" if method in ("auto", "forkserver") and fork_server_available() else "spawn"
        self.fork_context: multiprocessing.context.BaseContext | None = None
        if self.method == "forkserver":
            self.fork_context = multiprocessing.get_context("forkserver")
            self.fork_context.set_forkserver_preload(["api.worker.cli", "api.forked"])

    def worker_arguments(self, spec: WorkerSpec, sentinel: Path) -> list[str]:
        return ["--worker-id", str(spec.worker_id), "--sentinel", str(sentinel), "--restart-after", str(spec.restart_after)]

    def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        sentinel = sentinel_path(self.run_dir, spec.worker_id)
        with contextlib.suppress(OSError):
            sentinel.unlink()
        arguments = self.worker_arguments(spec, sentinel)
        return self._fork(spec, arguments, sentinel) if self.fork_context else self._spawn(spec, arguments, sentinel)

    def _spawn(self, spec: WorkerSpec, arguments: list[str], sentinel: Path) -> WorkerProcess:
        command = [self.python, "-m", "api", *arguments, "--parent-pid", str(os.getpid())]
        options: dict[str, object] = {
            "stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
            "cwd": PROJECT_ROOT, "env": {**os.environ, "PYTHONUNBUFFERED": "1"},  # systemd's variables already removed
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
        return SpawnedWorker(popen, sentinel, self.probes)

    def _fork(self, spec: WorkerSpec, arguments: list[str], sentinel: Path) -> WorkerProcess:
        from api.forked import start_worker

        assert self.fork_context is not None
        output, child_output = socket.socketpair()
        commands, child_commands = socket.socketpair()
        try:
            process = self.fork_context.Process(  # type: ignore[attr-defined]
                target=start_worker, args=(arguments, self.listener, child_output, child_commands),
                name=f"worker-{spec.worker_id}", daemon=True)
            process.start()
        except BaseException:
            output.close()
            commands.close()
            raise
        finally:
            child_output.close()  # the child has its copies: end of file must come from it alone
            child_commands.close()
        commands.settimeout(1.0)
        stream = output.makefile("rb")
        output.close()  # the file keeps the socket open until the reader closes it
        self.logs.follow(stream, f"worker {spec.worker_id} pid {process.pid}", on_eof=self.on_exit)
        return ForkedWorker(process, commands, sentinel, self.probes)

    def close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()

    def close(self) -> None:
        self.probes.shutdown(wait=False, cancel_futures=True)
        if self.fork_context is not None:
            stop_fork_server()


def stop_fork_server() -> None:
    """Stop multiprocessing's fork server and resource tracker now, so that no helper process
    outlives the supervisor even briefly. (Their `_stop` methods are what CPython's own tests
    use; without them the helpers exit on their own once our end of their pipes closes.)"""
    from multiprocessing import forkserver, resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):  # type: ignore[attr-defined]
        with contextlib.suppress(AttributeError, OSError, ChildProcessError):
            helper._stop()
