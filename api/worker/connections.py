"""The waitress integration: how connections and requests reach the worker's lifecycle.

waitress serves the Flask app; these subclasses tell WorkerLifecycle when a client connects, sends a
request and is answered (and pass each request's task to the app in its WSGI environ, so the
inference it runs is reported for it: WorkerTask), render waitress's own refusals in the API's JSON error shape, and close idle
connections without ever resetting a request that arrives at that instant (WorkerChannel.close_if_idle).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
import time
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import Error as WaitressError

from api.app import WORKER_HEADER, WORKER_REQUEST
from api.config import Settings
from api.errors import (
    ApiError,
    EngineFailure,
    InvalidRequest,
    PayloadTooLarge,
    RequestHeadersTooLarge,
    UnsupportedTransferEncoding,
)
from api.request_log import REQUEST_ID_HEADER, request_id
from api.wire.shapes import error_body
from api.worker.lifecycle import WorkerLifecycle

log = logging.getLogger("api.worker")  # one logger name for the whole worker, as its log lines show

WAITRESS_THREADS = 4
SERVER_IDENT = "gpt4all-api"
FRESH_CONNECTION_GRACE = 1.0
"""How long a client that connected may take to send its request: meanwhile the worker holds off
other clients (and a draining worker waits for it). A silent connection stops holding it after this."""
SILENT_CONNECTION_TIMEOUT = 10.0
"""A connection that has sent no request this long after connecting is closed. A client sends its
request at once; left to waitress, a slowloris's connections would stay for its channel_timeout (120 s)."""
LINGER_SECONDS = 1.0
"""After the worker shuts its side of an idle connection, how long it goes on reading (and dropping)
what the client had already sent: closing a socket with unread data would reset the connection."""
_client_keys = itertools.count(1)  # one per public connection, for WorkerLifecycle.client_engaged


def server_options(settings: Settings) -> dict[str, Any]:
    return {
        "threads": WAITRESS_THREADS,
        "channel_request_lookahead": 1,  # lets the app notice a client that went away
        "max_request_body_size": settings.max_request_bytes + 1,  # waitress refuses a body *at* its limit
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


def _client_path(request: Any, refused: WaitressError) -> str:
    """The path the client asked for, or "" (OpenAI's error shape) when waitress never read it: an
    unreadable request line leaves none, and headers over the limit get a stand-in `GET /` of waitress's."""
    path = getattr(request, "path", None)
    return path if isinstance(path, str) and refused.code != 431 else ""


class JsonErrorTask(ErrorTask):
    """waitress's own error answers in the JSON error shape of the interface the request's path belongs
    to (api/wire/shapes.py: Anthropic's, Ollama's or OpenAI's), tagged with the worker and the
    request id like every other answer (waitress writes plain text). The connection still closes after it."""

    def execute(self) -> None:
        refused: WaitressError = self.request.error
        error = waitress_refusal(refused, self.channel.server.adj)
        body = json.dumps(error_body(_client_path(self.request, refused), error)).encode()
        self.status = f"{error.status} {refused.reason}"
        offered = getattr(self.request, "headers", {}).get("X_REQUEST_ID")  # waitress's parser's key for the header
        self.response_headers.extend([("Content-Type", "application/json"), (WORKER_HEADER, str(os.getpid())),
                                      (REQUEST_ID_HEADER, request_id(offered))])
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


class WorkerTask(WSGITask):
    """A waitress task that tells the lifecycle which HTTP requests touched a model.

    It hands itself to the app in the WSGI environ (WORKER_REQUEST); the generation service passes
    it back to WorkerLifecycle.inference_started (a lifecycle.ServedRequest), which marks it."""

    touched_model = False

    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()  # built once per task, then cached by waitress
        environ[WORKER_REQUEST] = self
        return environ

    def service(self) -> None:
        lifecycle, public = self.channel.lifecycle, self.channel.one_client_at_a_time
        self.channel.started_requests += 1
        if public:
            lifecycle.client_engaged(self.channel.client_key)
        try:
            super().service()
        finally:
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
        channel = self.channel
        return channel.lifecycle.closes_connections() or (channel.one_client_at_a_time and readable_now(channel.server.socket))


class WorkerChannel(ApiChannel):
    """A client connection; on the public socket it holds the worker from accept to answer.

    The worker closes connections that no request is using (when it drains, when silent ones
    crowd it, when one stays silent too long) through close_if_idle, which never resets a request
    that arrives at that instant: see there."""

    task_class = WorkerTask
    lifecycle: WorkerLifecycle  # set by bound_channel: waitress builds a channel from its class alone
    one_client_at_a_time = False  # True on the public socket: a client holds the worker from accept to answer
    started_requests = 0
    lingering_until = 0.0  # once its sending side is shut: when to stop reading and close

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.client_key = next(_client_keys)  # not id(): a closed channel's id can come back
        if self.one_client_at_a_time:
            self.lifecycle.client_connected(self.client_key)

    def handle_close(self) -> None:
        if self.one_client_at_a_time:
            self.lifecycle.client_closed(self.client_key)
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
        if self.one_client_at_a_time:
            self.lifecycle.client_closed(self.client_key)

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


def bound_channel(lifecycle: WorkerLifecycle, *, one_client_at_a_time: bool) -> type[WorkerChannel]:
    """The channel class of one of this worker's servers: waitress makes each connection's channel
    from a class, so what the channel needs (the lifecycle, whether a client holds the worker) is
    given to a subclass of its own rather than attached to waitress's server object."""
    name = "PublicChannel" if one_client_at_a_time else "ControlChannel"
    return type(name, (WorkerChannel,), {"lifecycle": lifecycle, "one_client_at_a_time": one_client_at_a_time})


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
