"""The supervisor's pid file, locked for as long as it runs.

The lock (flock on POSIX, msvcrt.locking on Windows) is what keeps a second supervisor out; the
kernel releases it when the process dies, however it dies, so a stale file left by a killed
supervisor never blocks the next start. The pid written inside is for people and scripts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PID_FILE_NAME = "supervisor.pid"


class AlreadyRunning(Exception):
    def __init__(self, path: Path, pid: str) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"another supervisor ({who}) is already running with the pid file {path}; stop it first, "
                         "or give this one its own WATCHDOG_TEMPFILE folder")
        self.pid = pid


class PidFile:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / PID_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.name == "nt":  # Windows cannot delete an open file; the lock goes with the handle
            os.close(fd)
        with contextlib.suppress(OSError):
            self.path.unlink()  # POSIX: before closing, so we never delete a successor's file
        if os.name != "nt":
            os.close(fd)


if os.name == "nt":
    import msvcrt

    def _lock(fd: int) -> None:
        # Lock a byte past the pid text, so readers can still read the pid.
        os.lseek(fd, 64, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        os.lseek(fd, 0, os.SEEK_SET)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
