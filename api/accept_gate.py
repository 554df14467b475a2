"""The accept gate: the supervisor's 503 fallback and a worker never accept on the shared socket at once.

While no worker is ready and none will be soon, the supervisor answers clients itself with a 503
(supervisor/fallback.py). A worker still loading its model may finish at any moment and start
accepting, and its sentinel says so only afterwards; a frozen one may be continued. So a worker
passes the gate before it first accepts, and the supervisor answers only while it holds the
gate closed:
- the gate is a lock on a file in the run folder; a worker takes it shared just before it first
  accepts and holds it until it exits (the OS drops it when the process dies, however it dies);
- the supervisor closes the gate by taking it exclusively, without waiting: that succeeds only
  while no worker holds it, that is while no worker is accepting or will accept again;
- a worker that finishes loading while the gate is closed says READY in its sentinel, then waits
  at the gate; READY makes the supervisor stop answering and open the gate, and the worker goes on.
A worker frozen or stuck while loading holds nothing, so clients get a 503 instead of waiting for it.

On Windows msvcrt has no shared lock: the gate never closes there, and the supervisor answers
only while no worker process that could accept exists at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GATE_FILE = "accept-gate.lock"


class AcceptGate:
    """One side of the gate in `run_dir`: a worker calls `wait_until_open`, the supervisor
    `close` and `open`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / GATE_FILE
        self._fd: int | None = None
        self._closed = False

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children
        return self._fd

    # -- a worker

    def wait_until_open(self) -> None:
        """Wait while the supervisor holds the gate closed, then hold it open until this process exits."""
        _lock_shared(self._descriptor())

    # -- the supervisor

    def close(self) -> bool:
        """Close the gate unless a worker holds it open; True if it is closed (by us) now."""
        if not self._closed:
            self._closed = _try_lock_exclusive(self._descriptor())
        return self._closed

    def open(self) -> None:
        """Let workers through again (and a worker waiting at the gate go on)."""
        if self._closed:
            _unlock(self._descriptor())
            self._closed = False


if sys.platform == "win32":
    def _lock_shared(fd: int) -> None:
        pass

    def _try_lock_exclusive(fd: int) -> bool:
        return False

    def _unlock(fd: int) -> None:
        pass
else:
    import fcntl

    def _lock_shared(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_SH)

    def _try_lock_exclusive(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
