"""A worker process: load the model, serve the Flask app with waitress.

Standalone (`python -m api`) it binds LISTEN_IP:LISTEN_PORT itself and serves until interrupted.

Under the supervisor (`python -m api --worker-id K --sentinel PATH --listen-fd N ...`, see
supervisor/) it follows the contract in api.protocol:
- it serves the listening socket the supervisor bound, and the same app on a private loopback
  port (the *control* port, its own waitress loop and threads) where the supervisor probes /health;
- it accepts on the public socket only while READY: not while its model loads, not while an
  inference runs (the next client goes to a spare), never again once it is DRAINING, and not
  before it passed the accept gate (api.accept_gate: never while the supervisor's 503 fallback
  answers on the same socket); and it takes
  one client at a time: after accepting a connection it accepts no other until that client's
  request is answered, so parallel clients spread over the workers and, with restart-per-request,
  none of them meets a used model;
- it serves clients in turn: a connection that sends no request within FRESH_CONNECTION_GRACE stops
  holding it, and while such silent ones stay open new connections hold nothing (a slowloris delays
  no one by more than one grace); a response closes its kept-alive connection when another client
  waits in the listen queue; and it closes idle connections without ever resetting a request that
  arrives at that instant (WorkerChannel.close_if_idle);
- before it runs a model it takes one of the WORKERS inference slots that all workers share
  (api.inference_slots), so spares that took a client wait instead of oversubscribing the cores;
- it reports itself in its sentinel file (state, requests served, token heartbeat);
- after RESTART_AFTER_REQUESTS inference requests (the supervisor passes the number, jitter
  included), or after a generation that ran over its time limit, or on a `drain` command, it
  answers what it has accepted, closes those connections, and exits with a named exit code;
- it dies with its supervisor: end of file on stdin, and PR_SET_PDEATHSIG on Linux.

This module, not the Flask app, decides when to accept connections; the app only reports
inference through the InferenceObserver protocol (api.generation), which WorkerLifecycle implements.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import waitress
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import Error as WaitressError

from api.accept_gate import AcceptGate
from api.app import WORKER_HEADER, create_app
from api.config import ConfigError, Settings, check_model_files, load_settings
from api.errors import (
    ApiError,
    EngineFailure,
    InvalidRequest,
    PayloadTooLarge,
    RequestHeadersTooLarge,
    UnsupportedTransferEncoding,
)
from api.inference_slots import InferenceSlots
from api.protocol import (
    EXIT_BAD_SOCKET,
    EXIT_CONFIG,
    EXIT_DRAINED,
    EXIT_MODEL_LOAD_FAILED,
    EXIT_ORPHANED,
    EXIT_SERVED,
    EXIT_STOPPED,
    Command,
    Sentinel,
    WorkerState,
    write_sentinel,
)
from api.runtime import Runtime

log = logging.getLogger("api.worker")

WAITRESS_THREADS = 4
CONTROL_THREADS = 2  # the control port serves health probes
PROGRESS_WRITE_INTERVAL = 0.5
"""Seconds between sentinel writes while tokens come: the heartbeat, throttled."""
FRESH_CONNECTION_GRACE = 1.0
"""How long a client that connected may take to send its request: meanwhile the worker holds off
other clients (and a draining worker waits for it). A silent connection stops holding it after this."""
SILENT_CONNECTION_TIMEOUT = 10.0
"""A connection that has sent no request this long after connecting is closed. A client sends its
request at once; left to waitress, a slowloris's connections would stay for its channel_timeout (120 s)."""
LINGER_SECONDS = 1.0
"""After the worker shuts its side of an idle connection, how long it goes on reading (and dropping)
what the client had already sent: closing a socket with unread data would reset the connection."""
EXIT_CHECK_INTERVAL = 0.05
SERVER_IDENT = "gpt4all-api"


def configure_logging(settings: Settings, *, supervised: bool = False) -> None:
    # Under the supervisor every line is stamped and tagged by its log writer.
    fmt = "%(levelname)s %(name)s: %(message)s" if supervised else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if settings.debug else logging.INFO, format=fmt, stream=sys.stderr)


def server_options(settings: Settings) -> dict[str, Any]:
    return {
        "threads": WAITRESS_THREADS,
        "channel_request_lookahead": 1,  # lets the app notice a client that went away
        "max_request_body_size": settings.max_request_bytes,
        "ident": SERVER_IDENT,
    }


# -- the answers waitress gives itself, before the app sees a request


def waitress_refusal(error: WaitressError, adj: Adjustments) -> ApiError:
    """The API error that stands for a request waitress refused on its own (bad framing, a body or
    headers over its limits, an unsupported Transfer-Encoding, or a crash of its own)."""
    if error.code == 413:
        return PayloadTooLarge("the request body is larger than MAX_REQUEST_BYTES")
    if error.code == 431:
        return RequestHeadersTooLarge(f"the request line and headers are larger than {adj.max_request_header_size} bytes")
    if error.code == 501:
        return UnsupportedTransferEncoding("the request's Transfer-Encoding is not supported (only chunked is)")
    if 400 <= error.code < 500:
        return InvalidRequest(f"the request is not valid HTTP/1.1: {error.body}")
    return EngineFailure("internal error; see the server log")  # waitress's text may hold a traceback


class JsonErrorTask(ErrorTask):
    """waitress's own error answers in the API's JSON error shape, tagged with the worker like every
    other answer (waitress writes plain text). The connection still closes after it."""

    def execute(self) -> None:
        refused: WaitressError = self.request.error
        error = waitress_refusal(refused, self.channel.server.adj)
        body = json.dumps(error.to_dict()).encode()
        self.status = f"{error.status} {refused.reason}"
        self.response_headers.extend([("Content-Type", "application/json"), (WORKER_HEADER, str(os.getpid()))])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class ApiChannel(HTTPChannel):
    """A connection whose refusals by waitress read like the app's own errors."""

    error_task_class = JsonErrorTask

    def send_continue(self) -> None:
        """No `100 Continue` for a request waitress has already refused (say a Content-Length over
        MAX_REQUEST_BYTES): the client would send the whole body for nothing. It gets the 413 now."""
        if self.request is not None and self.request.error is not None:
            return
        super().send_continue()


# -- standalone


def serve(settings: Settings) -> int:
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    server = waitress.create_server(app, host=settings.listen_ip, port=settings.listen_port, **server_options(settings))
    server.channel_class = ApiChannel
    loader = threading.Thread(target=_load, args=(runtime,), name="model-loader", daemon=True)
    loader.start()
    log.info("listening on http://%s:%d", settings.listen_ip, settings.listen_port)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return EXIT_STOPPED


def _load(runtime: Runtime) -> None:
    try:
        runtime.load()
        log.info("model %s loaded; ready", runtime.settings.model_name)
    except Exception as error:
        log.error("model could not be loaded: %s", error)


# -- supervised: the worker's own life


_client_keys = itertools.count(1)  # one per public connection, for WorkerLifecycle.client_engaged
_current = threading.local()  # the waitress task this thread is serving, if any


class WorkerLifecycle:
    """The worker's state, counts and exit decision (an InferenceObserver for the app).

    States follow api.protocol.WorkerState: BOOTING -> READY <-> BUSY, and from any of them to
    DRAINING, which is final. Each change is written to the sentinel file. Every method may be
    called from any thread (waitress request threads, the model thread, the command reader).
    """

    def __init__(self, worker_id: int, sentinel: Path, *, restart_after: int, request_timeout: float,
                 stall_timeout: float, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[Path, Sentinel], None] = write_sentinel,
                 wait_for_gate: Callable[[], None] = lambda: None) -> None:
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
        self.requests_served = 0  # ... and answered
        self.generations = 0  # inferences running now
        self.inferences_started = 0
        self.progress_count = 0
        self.last_token_at: float | None = None  # wall clock, for the sentinel
        self._generation_started = 0.0
        self._last_progress = 0.0
        self._longest_gap = 0.0
        self._last_progress_write = 0.0
        self._bare_inferences = 0  # inferences outside a waitress task: each counts as a request
        self._clients: set[int] = set()  # public connections holding the worker: just accepted, or with a request running
        self._silent: set[int] = set()  # open public connections that sent no request within FRESH_CONNECTION_GRACE
        self.set_accepting: Callable[[bool], None] = lambda _accepting: None

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
        if self.state is state or self.state is WorkerState.DRAINING:
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

    def inference_started(self) -> None:
        with self._lock:
            task = getattr(_current, "task", None)
            if task is None:
                self._bare_inferences += 1
                self._request_began()
            elif not task.touched_model:
                task.touched_model = True
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

    def _request_ended(self) -> None:
        self.requests_served += 1
        self._ready_if_idle()

    def _ready_if_idle(self) -> None:
        """Back to READY once every request is answered and every generation has ended. The
        request thread and the model thread finish in either order; the later one gets here."""
        if self.state is WorkerState.BUSY and self.requests_served >= self.requests_started and not self.generations:
            self._become(WorkerState.READY)

    def request_finished(self, task: WorkerTask) -> None:
        if not task.touched_model:
            return
        with self._lock:
            if task.status[:3] in {"500", "504"}:
                self.drain(EXIT_DRAINED, f"an inference request ended with {task.status}")
            self._request_ended()
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
            return self.generations == 0 and self.requests_served >= self.requests_started


class WorkerTask(WSGITask):
    """A waitress task that tells the lifecycle which HTTP requests touched a model."""

    touched_model = False

    def service(self) -> None:
        lifecycle: WorkerLifecycle = self.channel.server.lifecycle
        public = self.channel.server.one_client_at_a_time
        _current.task = self
        self.channel.started_requests += 1
        if public:
            lifecycle.client_engaged(self.channel.client_key)
        try:
            super().service()
        finally:
            _current.task = None
            lifecycle.request_finished(self)
            if public:
                lifecycle.client_released(self.channel.client_key)

    def build_response_header(self) -> bytes:
        # A WSGI app may not set Connection (hop-by-hop): ask waitress to close instead.
        if self._closes_after_response():
            self.set_close_on_finish()
        return super().build_response_header()

    def _closes_after_response(self) -> bool:
        """Close the connection after this response when the worker drains, or when a client waits
        in the listen queue: this kept-alive client then reconnects behind it. Clients that keep
        their connections (the openai package does) and take turns would otherwise keep the worker
        from ever being free to accept a new one."""
        server = self.channel.server
        return server.lifecycle.closes_connections() or (server.one_client_at_a_time and readable_now(server.socket))


class WorkerChannel(ApiChannel):
    """A client connection; on the public socket it holds the worker from accept to answer.

    The worker closes connections that no request is using (when it drains, when silent ones
    crowd it, when one stays silent too long) through close_if_idle, which never resets a request
    that arrives at that instant: see there."""

    task_class = WorkerTask
    started_requests = 0
    lingering_until = 0.0  # once its sending side is shut: when to stop reading and close

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.client_key = next(_client_keys)  # not id(): a closed channel's id can come back
        if server.one_client_at_a_time:
            server.lifecycle.client_connected(self.client_key)

    def handle_close(self) -> None:
        if self.server.one_client_at_a_time:
            self.server.lifecycle.client_closed(self.client_key)
        super().handle_close()

    def awaiting_first_request(self, now: float) -> bool:
        """Connected less than FRESH_CONNECTION_GRACE ago and no request yet: it gets that long."""
        return not self.started_requests and now - self.creation_time < FRESH_CONNECTION_GRACE

    def missed_first_request(self, now: float) -> bool:
        """Connected FRESH_CONNECTION_GRACE ago or longer, still no request, and not being closed."""
        return not self.started_requests and not self.lingering_until and now - self.creation_time >= FRESH_CONNECTION_GRACE

    def silent_too_long(self, now: float) -> bool:
        return not self.started_requests and now - self.creation_time >= SILENT_CONNECTION_TIMEOUT

    def closable(self, now: float) -> bool:
        """No request is being answered or waits to be, nothing is left to send, none is arriving."""
        if self.lingering_until or self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed:
            return False
        return not self._request_arriving(now)

    def _request_arriving(self, now: float) -> bool:
        """Part of a request has come and more is coming. Not so if nothing came for
        FRESH_CONNECTION_GRACE, nor for a head still unfinished SILENT_CONNECTION_TIMEOUT after
        connecting: a slowloris trickles one in forever."""
        if self.request is None or now - self.last_activity >= FRESH_CONNECTION_GRACE:
            return False
        return bool(self.request.headers_finished) or not self.silent_too_long(now)

    # -- closing without a reset (loop thread only)

    def close_if_idle(self) -> None:
        """Close this connection unless a request is using it or has just arrived in its socket
        (that one is read and answered; a draining worker's answer says `Connection: close`).
        The worker shuts its sending side first, which the client reads as end of file: a client
        that sent a request at this very instant learns it was not processed. What was already on
        its way is read and dropped until the client closes too or LINGER_SECONDS pass, because
        closing a socket with unread data sends a reset instead of that clean end of file."""
        now = time.time()
        if not self.closable(now) or readable_now(self.socket):
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:  # the connection is already broken: nothing to protect
            self.will_close = True
            return
        self.lingering_until = now + LINGER_SECONDS
        if self.server.one_client_at_a_time:
            self.server.lifecycle.client_closed(self.client_key)

    def readable(self) -> bool:
        return bool(self.lingering_until) or super().readable()

    def writable(self) -> bool:
        if self.lingering_until:
            return time.time() >= self.lingering_until  # then handle_write closes it
        return bool(super().writable())

    def handle_write(self) -> None:
        if self.lingering_until:
            self.handle_close()
        else:
            super().handle_write()

    def received(self, data: bytes) -> bool:
        if self.lingering_until:
            return False  # dropped: the client has been told the connection ends (its end of file closes it)
        return bool(super().received(data))


def readable_now(sock: socket.socket | None) -> bool:
    """True if `sock` has something to read at once: data or a connection's end, or, on a listening
    socket (which every worker shares), a client waiting to be accepted."""
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile
        return False


def inherit_listening_socket(args: argparse.Namespace) -> socket.socket:
    """The public socket the supervisor bound: an inherited descriptor (POSIX) or, on Windows,
    `socket.share()` bytes on the first line of stdin (base64)."""
    if args.listen_fd is not None:
        return socket.socket(fileno=args.listen_fd)
    line = sys.stdin.buffer.readline()
    return socket.fromshare(base64.b64decode(line.strip()))


def die_with_parent(parent_pid: int | None) -> None:
    """On Linux, have the kernel kill us when our parent dies (even by SIGKILL). The parent is the
    supervisor, or the fork server, which exits when the supervisor does."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    expected = parent_pid or os.getppid()
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)


def name_process(worker_id: int) -> None:
    """Linux: show as `api-worker-K` in ps/top (a forked worker's command line is the fork server's)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_name = 15
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_name, f"api-worker-{worker_id}"[:15].encode(), 0, 0, 0)


def lower_this_threads_priority() -> None:
    """Load the model at the lowest CPU priority (Linux: nice is per thread, and llama.cpp's compute
    threads started from this one inherit it). A replacement loads while another worker generates;
    at equal priority their busy-waiting compute threads slow each other down several times over."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class SupervisedWorker:
    """Wires a WorkerLifecycle to waitress, the model loader, stdin commands and the exit."""

    def __init__(self, settings: Settings, lifecycle: WorkerLifecycle, public: socket.socket,
                 commands: BinaryIO) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.commands = commands
        self.runtime = Runtime(settings, lifecycle, InferenceSlots(settings.run_dir, settings.workers))
        app = create_app(settings, self.runtime)
        # Two servers, each with its own loop and threads: health probes on the control port never
        # queue behind requests waiting for the model on the public socket (a false "hung").
        self.public_server = waitress.create_server(app, sockets=[public], **server_options(settings))
        control = socket.create_server(("127.0.0.1", 0))
        lifecycle.control_port = control.getsockname()[1]
        self.control_server = waitress.create_server(
            app, sockets=[control], **{**server_options(settings), "threads": CONTROL_THREADS})
        for server in (self.public_server, self.control_server):
            server.channel_class = WorkerChannel
            server.lifecycle = lifecycle
            server.one_client_at_a_time = server is self.public_server
        self.public_server.accepting = False  # not before the model is loaded
        lifecycle.set_accepting = self._set_accepting

    def _set_accepting(self, accepting: bool) -> None:
        self.public_server.accepting = accepting
        self.public_server.pull_trigger()  # wake its loop so select() sees the change now

    def _stop_listening(self) -> None:
        """Close our copy of the public socket (in its loop thread), so that once every process
        has closed its copy, new clients are refused instead of waiting for a stopping service.
        The base close, not the server's: its trigger stays open for the connections in flight."""
        def close() -> None:
            if self.public_server.socket is not None:
                wasyncore.dispatcher.close(self.public_server)

        self.public_server.trigger.pull_trigger(close)

    def run(self) -> int:
        self.lifecycle.report()
        for target, name in ((self._load, "model-loader"), (self._read_commands, "commands"),
                             (self._watch_for_exit, "exit-watcher"), (self.control_server.run, "control-server")):
            threading.Thread(target=target, name=name, daemon=True).start()
        self.public_server.run()
        return EXIT_STOPPED

    def _load(self) -> None:
        lower_this_threads_priority()
        try:
            check_model_files(self.settings)
            self.runtime.load()
        except Exception as error:
            log.error("the model could not be loaded: %s", error)
            self.lifecycle.load_failed(f"a model could not be loaded: {error}")
            return
        log.info("model %s loaded; worker %d ready", self.settings.model_name, self.lifecycle.worker_id)
        self.lifecycle.ready()

    def _read_commands(self) -> None:
        for raw in self.commands:
            command, _, reason = raw.decode("utf-8", "replace").strip().partition(" ")
            if command == Command.DRAIN.value:
                self.lifecycle.drain(EXIT_DRAINED, reason or "the supervisor asked")
            elif command == Command.STOP.value:
                self.lifecycle.drain(EXIT_STOPPED, "the supervisor is stopping")
                self._stop_listening()
            elif command:
                log.warning("unknown command from the supervisor: %r", command)
        log.warning("the command pipe closed: the supervisor is gone; exiting")
        self._exit(EXIT_ORPHANED)

    def _watch_for_exit(self) -> None:
        lifecycle = self.lifecycle
        while True:
            lifecycle.changed.wait(EXIT_CHECK_INTERVAL)
            lifecycle.changed.clear()
            lifecycle.check_overtime()
            self._review_connections()
            code = lifecycle.exit_code
            if code == EXIT_MODEL_LOAD_FAILED:
                self._exit(code)
            if code is not None and lifecycle.idle() and not self.public_server.active_channels:
                log.info("worker %d exits: %s", lifecycle.worker_id, lifecycle.reason)
                self._exit(code)

    def _review_connections(self) -> None:
        """A connection that has sent no request within FRESH_CONNECTION_GRACE no longer holds the
        worker: an idle or stray connection must not keep every other client waiting. Connections
        to close are handed to the loop thread, which closes those still idle."""
        now = time.time()
        channels = list(self.public_server.active_channels.values())
        for channel in channels:
            if channel.missed_first_request(now):
                self.lifecycle.client_went_silent(channel.client_key)
        to_close = self._connections_to_close(channels, now)
        if to_close:
            self.public_server.trigger.pull_trigger(lambda: [channel.close_if_idle() for channel in to_close])

    def _connections_to_close(self, channels: list[WorkerChannel], now: float) -> list[WorkerChannel]:
        idle = [channel for channel in channels if channel.closable(now)]
        if self.lifecycle.exit_code is not None:
            # Draining: it exits once every connection is closed; one that just connected gets its grace.
            return [channel for channel in idle if not channel.awaiting_first_request(now)]
        to_close = [channel for channel in idle if channel.silent_too_long(now)]
        if self.public_server.in_connection_overflow and readable_now(self.public_server.socket):
            # At waitress's connection limit with a client waiting to be accepted: the silent
            # connections have had their chance; failing those, the longest-idle kept-alive one goes.
            silent = [channel for channel in idle if channel.missed_first_request(now)]
            kept_alive = [channel for channel in idle if not channel.awaiting_first_request(now)]
            to_close += silent or sorted(kept_alive, key=lambda channel: channel.last_activity)[:1]
        return to_close

    @staticmethod
    def _exit(code: int) -> None:
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_supervised(args: argparse.Namespace, public: socket.socket | None = None,
                   commands: BinaryIO | None = None) -> int:
    """Run as the supervisor's worker: `public` and `commands` are given when forked, else they
    come from the arguments and stdin."""
    die_with_parent(args.parent_pid)
    name_process(args.worker_id)
    # Signals from a terminal reach the whole process group; the supervisor decides for us.
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if public is None:
        try:
            public = inherit_listening_socket(args)
        except (OSError, ValueError) as error:
            print(f"worker {args.worker_id}: cannot use the listening socket: {error}", file=sys.stderr)
            return EXIT_BAD_SOCKET
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings, supervised=True)
    lifecycle = WorkerLifecycle(
        args.worker_id, args.sentinel, restart_after=args.restart_after,
        request_timeout=settings.request_timeout, stall_timeout=settings.stall_timeout,
        wait_for_gate=AcceptGate(settings.run_dir).wait_until_open,
    )
    return SupervisedWorker(settings, lifecycle, public, commands or sys.stdin.buffer).run()


def run_forked(argv: list[str], public: socket.socket, output: socket.socket, commands: socket.socket) -> None:
    """Entry of a worker forked by the supervisor's fork server (WORKER_START_METHOD=forkserver):
    the same worker, with its output and commands on socket pairs instead of pipes."""
    os.setpgid(0, 0)  # a process group of its own, as the spawned workers get
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.dup2(output.fileno(), 1)  # Python's and C's stdout and stderr, llama.cpp's included
    os.dup2(output.fileno(), 2)
    output.close()
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=True)
    args = parse_args([*argv, "--listen-fd", str(public.fileno())])
    sys.exit(run_supervised(args, public, commands.makefile("rb")))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api", description="A GPT4All API worker.")
    parser.add_argument("--worker-id", type=int, help="set by the supervisor: run as its worker number K")
    parser.add_argument("--sentinel", type=Path, help="the sentinel file to report to")
    parser.add_argument("--listen-fd", type=int, help="inherited listening socket (POSIX)")
    parser.add_argument("--listen-share", action="store_true", help="read the socket.share() bytes from stdin (Windows)")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid")
    parser.add_argument("--restart-after", type=int, default=0, help="exit after this many inference requests (0: never)")
    args = parser.parse_args(argv)
    if args.worker_id is not None and (args.sentinel is None or (args.listen_fd is None and not args.listen_share)):
        parser.error("--worker-id needs --sentinel and --listen-fd or --listen-share")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker_id is not None:
        return run_supervised(args)
    try:
        settings = load_settings()
        check_model_files(settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    return serve(settings)
