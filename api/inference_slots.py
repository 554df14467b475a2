"""At most WORKERS inferences at a time on this machine, whichever worker processes run them.

Every READY worker accepts a client: the warm spares too, and a replacement that finished loading
during a restart. Without a limit, WORKERS + WARM_SPARES generations could run at once, each with
the threads meant for one of WORKERS (N_THREADS divides the cores by WORKERS). On 2 cores, two
2-thread generations made llama.cpp's busy-waiting threads about 25 times slower. So a worker
takes one of WORKERS slots before it runs the model, and a client that reached a spare waits for
a slot the way it would otherwise wait in the accept queue.

The workers of one supervisor share its run folder. A slot is an OS lock on a file there, which
the OS drops when the process holding it dies, so a killed worker never leaks its slot.

Waiting for a slot is the line of api/slot_queue.py: first come first served across the worker
processes, at most MAX_QUEUE requests long, QUEUE_TIMEOUT at most, and a client that goes away
while it waits gives its place up at once. (Before, waiters slept on a lock in the kernel: no
bound, no timeout, and a client that left was noticed only once it reached the slot.) A request
takes its place (`admit`) before any prompt work, so a full line is a 503 within milliseconds.
Newcomers never overtake the line: a free slot goes to a newcomer only while nobody waits.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from api.slot_queue import SlotQueue, Ticket

POLL_SECONDS = 0.005  # Windows: how often a lock that cannot wait is tried again

Release = Callable[[], None]


class InferenceSlots:
    """`count` slots shared through lock files in `folder`, with the line to wait for them in;
    no folder means no limit (a standalone worker)."""

    def __init__(self, folder: Path | None, count: int, *, max_queue: int | None = None,
                 queue_timeout: float | None = None) -> None:
        self.folder = folder
        self.count = count
        self.paths = [folder / f"inference-slot-{index}.lock" for index in range(count)] if folder else []
        self.queue = SlotQueue(folder, max_queue, count) if folder else None
        self.queue_timeout = queue_timeout

    def admit(self) -> Place:
        """Take a free slot, or a place in line (before any prompt work); QueueFull if the line is full."""
        if self.queue is None:
            return Place(self, None, None)
        ticket, slot = self.queue.join(self._take_free)
        return Place(self, ticket, slot if isinstance(slot, int) else None)

    def acquire(self, is_disconnected: Callable[[], bool] = lambda: False, timeout: float | None = None) -> Release:
        """Wait for a slot (in line); return the function that gives it back."""
        return self.admit().wait(is_disconnected, timeout)

    def refusal(self) -> str:
        """Why a request that came now would be refused at once ('' if it would be admitted), for /ready."""
        if self.queue is None or self.queue.limit is None:
            return ""
        waiting = self.queue.live_tickets()
        if len(waiting) < self.queue.limit:
            return ""
        if not waiting:  # MAX_QUEUE=0: refused only while every slot is taken
            slot = self._take_free()
            if slot is not None:
                os.close(slot)
                return ""
        return self.queue.full(len(waiting)).message

    def _take_free(self) -> int | None:
        """A free slot's locked descriptor, without waiting, or None."""
        for path in self.paths:
            slot = _open(path)
            if _lock(slot, wait=False):
                return slot
            os.close(slot)
        return None

    def _releaser(self, fd: int) -> Release:
        """Give the slot back once, and record how long it was held (the Retry-After estimate)."""
        taken_at = time.monotonic()
        close = _closer(fd)
        times = self.queue.times if self.queue else None

        def release() -> None:
            if times is not None:
                times.record(time.monotonic() - taken_at)
            close()

        return _once(release)


class Place:
    """An admitted request: it holds a slot already (`slot`, a locked descriptor), or a ticket in
    line for one."""

    def __init__(self, slots: InferenceSlots, ticket: Ticket | None, slot: int | None) -> None:
        self._slots = slots
        self._ticket = ticket
        self._slot = slot

    def wait(self, is_disconnected: Callable[[], bool] = lambda: False, timeout: float | None = None) -> Release:
        """The slot, as the function that gives it back: at once if it was free, else after waiting
        in line (QueueTimeout, ClientLeft). `timeout` defaults to QUEUE_TIMEOUT."""
        slots = self._slots
        if slots.queue is None:
            return _nothing
        if self._slot is None:
            assert self._ticket is not None, "wait() once"
            ticket, self._ticket = self._ticket, None
            slot = slots.queue.wait(ticket, slots._take_free, is_disconnected=is_disconnected,
                                    timeout=slots.queue_timeout if timeout is None else timeout)
            assert isinstance(slot, int)
            self._slot = slot
        slot, self._slot = self._slot, None
        return slots._releaser(slot)

    def cancel(self) -> None:
        """Give up the place, or the slot taken but not used (safe after wait() too)."""
        if self._ticket is not None:
            self._ticket.leave()
            self._ticket = None
        if self._slot is not None:
            os.close(self._slot)
            self._slot = None


def _once(function: Release) -> Release:
    lock, left = threading.Lock(), [function]

    def call() -> None:
        with lock:
            if left:
                left.pop()()

    return call


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
