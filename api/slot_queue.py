"""The line of clients waiting for an inference slot: bounded, first come first served, timed.

Where a client waits, in this architecture. Every worker process accepts on the one listening
socket, one client at a time, and accepts only while it is READY. So a client waits in one of
two places:
- *inside a worker*: a spare (or a replacement that finished loading) took it, read its request
  and waits for one of the WORKERS inference slots (api/inference_slots.py). This is the line
  kept here. Each waiting request holds a ticket, a file in the run folder; tickets are served in
  the order they were issued (FIFO across all worker processes), at most MAX_QUEUE exist at once,
  a ticket older than QUEUE_TIMEOUT is given up with a 503, and a waiter whose client closed its
  connection gives its ticket back at once (it looks every POLL_SECONDS). A worker holds at most
  one waiting client, so no more clients can wait inside workers than there are loaded workers
  that are not generating: raise WARM_SPARES to let more wait (a forked spare costs little).
- *in the kernel's accept queue*, while no worker accepts: every worker is generating or already
  holds a waiting client, or is still loading. Nobody can count or answer those clients but the
  process that accepts them. With MAX_QUEUE set, the supervisor's fallback (supervisor/fallback.py)
  accepts them while the line is full, or while no worker can take a client and none is about to,
  and answers them at once with a 503; they never pile up there.

A ticket is a file whose owner holds a lock on it: the OS drops the lock when the owner dies
however it dies, so a killed worker's ticket is recognised and removed by the next one that looks.
Issuing a ticket happens under one more lock (the counter), so two workers never both take the
last place.

The Retry-After of a refused client is computed from the observed time a request holds its slot
(an average kept in the run folder, since each worker is fresh) and the length of the line.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from api.errors import ClientLeft, QueueFull, QueueTimeout, ServiceUnavailable

POLL_SECONDS = 0.01
"""How often a waiter looks whether it is first in line (and, first, whether a slot is free) and
whether its client is still there."""
TICKET_PREFIX = "queue-"
TICKET_SUFFIX = ".ticket"
COUNTER_FILE = "queue.lock"
TIMES_FILE = "request-seconds.txt"
TIMES_WEIGHT = 0.3  # weight of the newest observation in the running average
DEFAULT_REQUEST_SECONDS = 5.0  # assumed before any request has been measured


def is_ticket_name(name: str) -> bool:
    return name.startswith(TICKET_PREFIX) and name.endswith(TICKET_SUFFIX)


def ticket_number(name: str) -> int:
    return int(name[len(TICKET_PREFIX):].split("-", 1)[0])


class Ticket:
    """One waiting request's place in line; `leave()` gives it back (safe to call twice)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.name = path.name
        self._fd: int | None = fd

    def leave(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


class SlotQueue:
    """The line in `folder` for `slots` slots: at most `limit` tickets (None: no limit).
    `stopping()` true makes every waiter leave with a 503: the service is going away, and a client
    told so at once can go elsewhere (a load balancer retries it) instead of being cut off later."""

    def __init__(self, folder: Path, limit: int | None, slots: int = 1,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.folder = folder
        self.limit = limit
        self.slots = slots
        self.stopping = stopping
        self.times = RequestTimes(folder)

    # -- joining

    def join(self, may_skip: Callable[[], object]) -> tuple[Ticket | None, object]:
        """Take a place, under the counter lock. If nobody waits, `may_skip()` is tried first (it
        takes a free slot, or returns None): then no ticket is needed and its result comes back.
        QueueFull if the line is full."""
        with self._counter():
            waiting = self.live_tickets(purge=True)
            if not waiting:
                skipped = may_skip()
                if skipped is not None:
                    return None, skipped
            if self.limit is not None and len(waiting) >= self.limit:
                raise self.full(len(waiting))
            number = max([time.time_ns(), *(ticket_number(name) + 1 for name in waiting)])
            path = self.folder / f"{TICKET_PREFIX}{number:020d}-{os.getpid()}{TICKET_SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            _lock(fd)
            return Ticket(path, fd), None

    def full(self, waiting: int) -> QueueFull:
        retry_after = self.retry_after(waiting)
        return QueueFull(f"The server is at capacity: every inference slot is busy and {waiting} request(s) wait "
                         f"for one (MAX_QUEUE is {self.limit}). Try again in about {retry_after} s.",
                         retry_after=retry_after)

    def retry_after(self, waiting: int, slots: int | None = None) -> int:
        """Seconds until a request sent now would likely be served: the line ahead of it and the
        request running, at the observed time per request, spread over the slots."""
        return max(1, math.ceil(self.times.average() * (waiting + 1) / max(1, slots or self.slots)))

    # -- waiting

    def first_in_line(self, ticket: Ticket) -> bool:
        """Whether no live ticket older than `ticket` exists (a dead owner's is removed)."""
        for name in sorted(self._ticket_names()):
            if name == ticket.name:
                return True
            if _alive(self.folder / name):
                return False
            with self._counter():
                _remove_if_dead(self.folder / name)
        return True

    def wait(self, ticket: Ticket, take: Callable[[], object], *, timeout: float | None,
             is_disconnected: Callable[[], bool]) -> object:
        """Wait in line until first and `take()` returns something; give the place up at once on a
        disconnect (ClientLeft) or after `timeout` seconds (QueueTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if self.first_in_line(ticket):
                    taken = take()
                    if taken is not None:
                        return taken
                if is_disconnected():
                    raise ClientLeft("the client closed its connection while it waited for an inference slot")
                if self.stopping():
                    raise ServiceUnavailable("The service is stopping; this request was not started. Try again "
                                             "(another server, or this one once it is back).", code="stopping")
                if deadline is not None and time.monotonic() >= deadline:
                    raise QueueTimeout(f"No inference slot became free within QUEUE_TIMEOUT ({timeout:g} s).",
                                       retry_after=self.retry_after(len(self.live_tickets())))
                time.sleep(POLL_SECONDS)
        finally:
            ticket.leave()

    # -- looking

    def waiting(self) -> int:
        """How many requests wait for a slot now."""
        return len(self.live_tickets())

    def live_tickets(self, *, purge: bool = False) -> list[str]:
        """The names of the tickets whose owners are alive, oldest first (`purge`: remove the others;
        only under the counter lock)."""
        names = []
        for name in sorted(self._ticket_names()):
            path = self.folder / name
            if _alive(path):
                names.append(name)
            elif purge:
                _remove_if_dead(path)
        return names

    def _ticket_names(self) -> list[str]:
        try:
            return [name for name in os.listdir(self.folder) if is_ticket_name(name)]
        except OSError:
            return []

    @contextlib.contextmanager
    def _counter(self) -> Iterator[None]:
        fd = os.open(self.folder / COUNTER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(fd)
            yield
        finally:
            os.close(fd)


class RequestTimes:
    """The running average of how long a request holds its inference slot, shared by the workers
    of one run folder (each worker is fresh, so none could learn it alone). It is rewritten in
    place, one small write of a fixed width: a rename per request cost 1.4 ms on an overlay file
    system, the write costs microseconds, and a torn read (never seen) would only fall back to the
    default."""

    WIDTH = 24

    def __init__(self, folder: Path) -> None:
        self.path = folder / TIMES_FILE

    def average(self) -> float:
        try:
            value = float(self.path.read_bytes()[:self.WIDTH])
        except (OSError, ValueError):
            return DEFAULT_REQUEST_SECONDS
        return value if value >= 0 else DEFAULT_REQUEST_SECONDS

    def record(self, seconds: float) -> None:
        """Fold one observation in (a lost race between two workers loses one observation: harmless)."""
        previous = self.average() if self.path.exists() else seconds
        value = (1 - TIMES_WEIGHT) * previous + TIMES_WEIGHT * seconds
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{value:<{self.WIDTH}.6f}".encode("ascii"))  # at offset 0: just opened
            finally:
                os.close(fd)


def _remove_if_dead(path: Path) -> None:
    if not _alive(path):
        with contextlib.suppress(OSError):
            path.unlink()


if sys.platform == "win32":
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)

    def _alive(path: Path) -> bool:
        """A ticket whose first byte someone has locked (its owner is alive)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return True
        else:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            return False
        finally:
            os.close(fd)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _alive(path: Path) -> bool:
        """A ticket someone holds locked (its owner is alive); False once it is gone or unlocked."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
