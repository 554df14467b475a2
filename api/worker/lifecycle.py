"""The worker's own life: its state, its counts and its decision to exit.

WorkerLifecycle knows nothing of waitress or gpt4all: the connection code (api/worker/connections.py)
tells it about clients and requests, the app tells it about inference through the InferenceObserver
protocol (api.generation), and it reports itself through the sentinel contract of api/protocol.py.
Which HTTP request an inference belongs to comes with the call: the request's waitress task rides in
its WSGI environ (api.app.WORKER_REQUEST) and the generation service hands it to inference_started,
so no state is kept per thread. Tests drive it with a fake clock and a fake sentinel writer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from api.protocol import (
    EXIT_DRAINED,
    EXIT_MODEL_LOAD_FAILED,
    EXIT_SERVED,
    Sentinel,
    WorkerState,
    write_sentinel,
)

log = logging.getLogger("api.worker")  # one logger name for the whole worker, as its log lines show

PROGRESS_WRITE_INTERVAL = 0.5
"""Seconds between sentinel writes while tokens come: the heartbeat, throttled."""


# Every allowed change of state, in one place. DRAINING is final: once a worker is on its way out,
# nothing brings it back to accepting.
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.BOOTING: frozenset({WorkerState.READY, WorkerState.BUSY, WorkerState.DRAINING}),
    WorkerState.READY: frozenset({WorkerState.BUSY, WorkerState.DRAINING}),
    WorkerState.BUSY: frozenset({WorkerState.READY, WorkerState.DRAINING}),
    WorkerState.DRAINING: frozenset(),
}


class ServedRequest(Protocol):
    """What the lifecycle needs of an HTTP request being served (a waitress task, WorkerTask):
    whether it has touched a model yet, and once answered its status."""

    touched_model: bool
    status: str


class WorkerLifecycle:
    """The worker's state, counts and exit decision (an InferenceObserver for the app).

    States follow api.protocol.WorkerState: BOOTING -> READY <-> BUSY, and from any of them to
    DRAINING, which is final. Each change is written to the sentinel file. Every method may be
    called from any thread (waitress request threads, the model thread, the command reader).
    """

    def __init__(self, worker_id: int, sentinel: Path, *, restart_after: int, request_timeout: float,
                 stall_timeout: float, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[Path, Sentinel], None] = write_sentinel,
                 wait_for_gate: Callable[[], None] = lambda: None,
                 set_accepting: Callable[[bool], None] = lambda _accepting: None) -> None:
        self.worker_id = worker_id
        self.sentinel_path = sentinel
        self.restart_after = restart_after
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self._clock = clock
        self._write = write
        self._wait_for_gate = wait_for_gate
        self._gate_passed = False  # the first accept waits for the accept gate
        self._lock = threading.RLock()
        self.changed = threading.Event()  # wakes the exit watcher
        self.state = WorkerState.BOOTING
        self.reason = ""
        self.exit_code: int | None = None  # set once DRAINING: the code to exit with
        self.control_port: int | None = None
        self.requests_started = 0  # inference requests begun (HTTP requests that touched a model)
        self.requests_answered = 0  # ... and answered, whatever the answer
        self.requests_served = 0  # ... and answered with success (2xx/3xx): what the sentinel reports
        self.generations = 0  # inferences running now
        self.inferences_started = 0
        self.progress_count = 0
        self.last_token_at: float | None = None  # wall clock, for the sentinel
        self._generation_started = 0.0
        self._last_progress = 0.0
        self._longest_gap = 0.0
        self._last_progress_write = 0.0
        self._bare_inferences = 0  # inferences that came with no request: each counts as a request of its own
        self._clients: set[int] = set()  # public connections holding the worker: just accepted, or with a request running
        self._silent: set[int] = set()  # open public connections that sent no request within FRESH_CONNECTION_GRACE
        self.set_accepting = set_accepting  # opens or closes the public socket (the supervised worker sets it once its server exists)

    # -- reporting

    def snapshot(self) -> Sentinel:
        with self._lock:
            return Sentinel(
                worker_id=self.worker_id, pid=os.getpid(), state=self.state, requests_served=self.requests_served,
                generating=self.generations > 0, inferences=self.inferences_started, progress=self.progress_count,
                last_token_at=self.last_token_at,
                control_port=self.control_port, reason=self.reason,
            )

    def report(self) -> None:
        with self._lock:
            self._write(self.sentinel_path, self.snapshot())

    def _become(self, state: WorkerState) -> None:
        """The one place the state changes; accepting follows it: stopped before a change is
        reported, started only after READY is reported, so no one sees a worker accept unannounced."""
        if state not in TRANSITIONS[self.state]:
            return
        self.state = state
        if state is WorkerState.READY:
            self.report()
            self._accept_if_free()
        else:
            self.set_accepting(False)

    def _accept_if_free(self) -> None:
        if self.state is WorkerState.READY and self._gate_passed and not self._clients:
            self.set_accepting(True)

    # -- one client at a time (called by WorkerChannel and WorkerTask for the public socket)

    def client_connected(self, key: int) -> None:
        """A connection was accepted: take no other client until its request is answered (or it
        goes silent). Without this a worker accepts more connections in the moment between
        accepting one and its request reaching the model, and serves them itself while another
        worker idles. But while connections that went silent are open (a slowloris), a new one
        holds nothing: each would otherwise hold the worker for its grace, one after another, and
        a client queued behind twenty of them would wait twenty graces."""
        with self._lock:
            if not self._silent:
                self._clients.add(key)
                self.set_accepting(False)

    def client_engaged(self, key: int) -> None:
        """A request arrived on a connection: take no other client until it is answered."""
        with self._lock:
            self._silent.discard(key)
            self._clients.add(key)
            self.set_accepting(False)

    def client_released(self, key: int) -> None:
        """Its request was answered: other clients may come."""
        with self._lock:
            if key in self._clients:
                self._clients.discard(key)
                self._accept_if_free()

    def client_went_silent(self, key: int) -> None:
        """It sent no request within FRESH_CONNECTION_GRACE of connecting: it no longer holds the
        worker, and while it stays open new connections do not either."""
        with self._lock:
            if key not in self._silent:
                self._silent.add(key)
                self.client_released(key)

    def client_closed(self, key: int) -> None:
        with self._lock:
            self._silent.discard(key)
            self.client_released(key)

    # -- boot

    def ready(self) -> None:
        """The model is loaded: say READY, pass the accept gate, then accept. READY comes first
        because it is what makes the supervisor open a closed gate."""
        with self._lock:
            if self.state is not WorkerState.BOOTING:
                self.report()  # told to drain while loading: it says it loaded, and leaves
                return
            self._become(WorkerState.READY)
        self._wait_for_gate()  # outside the lock: a drain may come meanwhile
        with self._lock:
            self._gate_passed = True
            self._accept_if_free()

    def load_failed(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            self.exit_code = EXIT_MODEL_LOAD_FAILED
            self.report()
        self.changed.set()

    # -- the InferenceObserver protocol (api.generation)

    def inference_started(self, request: ServedRequest | None) -> None:
        """`request`: the HTTP request the inference runs for, the first inference of which begins an
        inference request (BUSY, counted towards RESTART_AFTER_REQUESTS); None for one that came
        without a request, which counts as a request of its own."""
        with self._lock:
            if request is None:
                self._bare_inferences += 1
                self._request_began()
            elif not request.touched_model:
                request.touched_model = True
                self._request_began()
            now = self._clock()
            self.generations += 1
            self.inferences_started += 1
            self._generation_started = self._last_progress = now
            self._longest_gap = 0.0
            self.report()

    def progress(self) -> None:
        with self._lock:
            now = self._clock()
            self._longest_gap = max(self._longest_gap, now - self._last_progress)
            self._last_progress = now
            self.last_token_at = time.time()
            if now - self._last_progress_write >= PROGRESS_WRITE_INTERVAL:
                self._last_progress_write = now
                self.progress_count += 1
                self.report()

    def inference_finished(self) -> None:
        with self._lock:
            now = self._clock()
            self.generations = max(0, self.generations - 1)
            overtime = self._overtime(now)
            if overtime:
                self.drain(EXIT_DRAINED, overtime)
            if self._bare_inferences:
                self._bare_inferences -= 1
                self._request_ended()
            else:
                self._ready_if_idle()
            self.report()
        self.changed.set()

    def _overtime(self, now: float) -> str:
        """Why the running (or just finished) generation counts as over its limits, or ''."""
        if now - self._generation_started >= self.request_timeout:
            return f"a generation ran past REQUEST_TIMEOUT ({self.request_timeout:g} s)"
        if max(self._longest_gap, now - self._last_progress) >= self.stall_timeout:
            return f"a generation produced nothing for STALL_TIMEOUT ({self.stall_timeout:g} s)"
        return ""

    def check_overtime(self) -> None:
        """Called periodically: a generation over its limit means this process gets replaced.
        (The request itself is answered with a 504 by api.generation.)"""
        with self._lock:
            if self.generations and self.state is not WorkerState.DRAINING:
                overtime = self._overtime(self._clock())
                if overtime:
                    self.drain(EXIT_DRAINED, overtime)

    # -- requests (called by WorkerTask)

    def _request_began(self) -> None:
        self.requests_started += 1
        self._become(WorkerState.BUSY)
        if self.restart_after and self.requests_started >= self.restart_after:
            self.drain(EXIT_SERVED, f"served RESTART_AFTER_REQUESTS ({self.restart_after}) inference request(s)")

    def _request_ended(self, succeeded: bool = True) -> None:
        self.requests_answered += 1
        if succeeded:
            self.requests_served += 1
        self._ready_if_idle()

    def _ready_if_idle(self) -> None:
        """Back to READY once every request is answered and every generation has ended. The
        request thread and the model thread finish in either order; the later one gets here."""
        if self.state is WorkerState.BUSY and self.requests_answered >= self.requests_started and not self.generations:
            self._become(WorkerState.READY)

    def request_finished(self, task: ServedRequest) -> None:
        if not task.touched_model:
            return
        with self._lock:
            if task.status[:3] in {"500", "504"}:
                self.drain(EXIT_DRAINED, f"an inference request ended with {task.status}")
            self._request_ended(succeeded=task.status[:1] in {"2", "3"})
            self.report()
        self.changed.set()

    def closes_connections(self) -> bool:
        """A draining worker closes every connection after its response, so a keep-alive client
        sends its next request on a new connection, which a live worker accepts."""
        return self.state is WorkerState.DRAINING

    # -- leaving

    def drain(self, exit_code: int, reason: str) -> None:
        with self._lock:
            if self.exit_code is None:
                self.exit_code = exit_code
                self.reason = reason
                log.info("worker %d is draining: %s", self.worker_id, reason)
            self._become(WorkerState.DRAINING)
            self.report()
        self.changed.set()

    def idle(self) -> bool:
        with self._lock:
            return self.generations == 0 and self.requests_answered >= self.requests_started
