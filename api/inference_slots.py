"""At most WORKERS inferences at a time on this machine, whichever worker processes run them.

Every READY worker accepts a client: the warm spares too, and a replacement that finished loading
during a restart. Without a limit, WORKERS + WARM_SPARES generations could run at once, each with
the threads meant for one of WORKERS (N_THREADS divides the cores by WORKERS). On 2 cores, two
2-thread generations made llama.cpp's busy-waiting threads about 25 times slower. So a worker
takes one of WORKERS slots before it runs the model, and a client that reached a spare waits for
a slot the way it would otherwise wait in the accept queue.

The workers of one supervisor share its run folder. A slot is an OS lock on a file there, which
the OS drops when the process holding it dies, so a killed worker never leaks its slot. Waiting
costs no CPU and keeps order: waiters queue on one more lock (the turnstile) asleep in the kernel,
and only the one at its head looks for a free slot. (Polling waiters stole cycles from the
generations they waited for, and a worker that had just given a slot back took it again before
a poller noticed, so one client could starve.) There is no timeout: a slot is held by a running
generation, which ends, or by a hung worker, which the supervisor kills. (On Windows, where
msvcrt has no lock that waits, the head and the turnstile poll every POLL_SECONDS instead.)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.005  # how often the waiter at the head looks for one of several slots

Release = Callable[[], None]


class InferenceSlots:
    """`count` slots shared through lock files in `folder`; no folder means no limit."""

    def __init__(self, folder: Path | None, count: int) -> None:
        self.folder = folder
        self.paths = [folder / f"inference-slot-{index}.lock" for index in range(count)] if folder else []

    def acquire(self) -> Release:
        """Wait for a slot; return the function that gives it back."""
        if self.folder is None:
            return _nothing
        turnstile = _open(self.folder / "inference-slots-queue.lock")
        try:
            _lock(turnstile, wait=True)
            slot = self._take_one()
        finally:
            os.close(turnstile)  # closing gives up a lock held through the descriptor
        return _closer(slot)

    def _take_one(self) -> int:
        if len(self.paths) == 1:  # the common case: wait for it asleep
            slot = _open(self.paths[0])
            _lock(slot, wait=True)
            return slot
        while True:
            for path in self.paths:
                slot = _open(path)
                if _lock(slot, wait=False):
                    return slot
                os.close(slot)
            time.sleep(POLL_SECONDS)


def _closer(fd: int) -> Release:
    """Close `fd` once, however often it is called: a second close could hit a reused descriptor."""
    left = [fd]
    lock = threading.Lock()

    def close() -> None:
        with lock:
            if left:
                os.close(left.pop())

    return close


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


if sys.platform == "win32":
    import msvcrt

    def _lock(fd: int, *, wait: bool) -> bool:
        """Lock the file's first byte (Windows drops it when the handle closes or the process dies)."""
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not wait:
                    return False
                time.sleep(POLL_SECONDS)
else:
    import fcntl

    def _lock(fd: int, *, wait: bool) -> bool:
        """flock: held by the open file, so two threads of one worker each need a slot of their own."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _nothing() -> None:
    pass
