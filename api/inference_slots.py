"""At most WORKERS inferences at a time on this machine, whichever worker processes run them.

Every READY worker accepts a client: the warm spares too, and a replacement that finished loading
during a restart. Without a limit, WORKERS + WARM_SPARES generations could run at once, each with
the threads meant for one of WORKERS (N_THREADS divides the cores by WORKERS). On 2 cores, two
2-thread generations made llama.cpp's busy-waiting threads about 25 times slower. So a worker
takes one of WORKERS slots before it runs the model, and a client that reached a spare waits for
a slot the way it would otherwise wait in the accept queue.

The workers of one supervisor share its run folder; a slot is an OS lock on a file there
(`filelock`: flock on POSIX, LockFileEx on Windows), which the OS drops when the process holding
it dies, so a killed worker never leaks its slot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

POLL_SECONDS = 0.005  # how often a waiting worker looks for a free slot

Release = Callable[[], None]


class InferenceSlots:
    """`count` slots shared through lock files in `folder`; no folder means no limit."""

    def __init__(self, folder: Path | None, count: int) -> None:
        self.paths = [folder / f"inference-slot-{index}.lock" for index in range(count)] if folder else []

    def acquire(self, timeout: float) -> Release | None:
        """Take a slot; return the function that gives it back, or None if none came free in time.
        Keep that function until the inference is over: the slot is held as long as it lives."""
        if not self.paths:
            return _nothing
        deadline = time.monotonic() + timeout
        while True:
            lock = self._try_each()
            if lock is not None:
                return lock.release
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_SECONDS)

    def _try_each(self) -> FileLock | None:
        start = random.randrange(len(self.paths))  # waiting workers do not all try slot 0 first
        for path in self.paths[start:] + self.paths[:start]:
            # A new lock object each time: one object is re-entrant, so two threads of one worker
            # (a chat and an embedding) would both get the slot through it.
            lock = FileLock(path, thread_local=False, fallback_to_soft=False, preserve_lock_file=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return lock
        return None


def _nothing() -> None:
    pass
