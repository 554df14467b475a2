"""A tiny responder that answers on the shared socket while no worker can.

When workers keep failing to start (a broken model file, say), a client connecting would wait in
the kernel's accept queue with no answer. Instead, while the arbiter says so, this thread accepts
those connections and answers every request with a 503 in the error shape of the interface its
path belongs to (api/wire/shapes.py), a `Retry-After` header and a message that says why; but
`/health` gets a 200 (the service is alive: its supervisor runs), `/ready` a 503 with the
reason and `/metrics` the metrics of the whole service (api/metrics.py). In that case it never
races a worker: the arbiter enables it only while no worker process that could accept exists or
the accept gate keeps them all out (api/accept_gate.py), and `disable()` returns only once no
further `accept()` can happen, before the arbiter spawns the next worker or opens the gate.

The arbiter also enables it while the service is *overloaded* (MAX_QUEUE set): every worker is
generating or holds a client waiting for a slot, and the line is full or no worker is about to be
free. Then the workers are up, and one that becomes free may accept beside this thread; both answer
a newcomer honestly (a worker queues it if there is room by then, or refuses it the same way).

It applies the workers' own access rules (api/access.py: AUTHORIZED_URLS, then API_KEY on every
route but the health checks), so a client that a worker would refuse gets the worker's 403 or 401
here too, and learns nothing about the service's trouble.
"""

from __future__ import annotations

import contextlib
import http
import json
import select
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from api.access import DEEP_CHECK_PATH, METRICS_PATH, AccessPolicy, is_deep_check
from api.errors import ApiError, ServiceUnavailable
from api.metrics import CONTENT_TYPE, exposition, meters
from api.request_log import REQUEST_ID_HEADER, request_id
from api.wire.shapes import error_body

READY_PATH = "/ready"

READ_TIMEOUT = 2.0
MAX_HEADER_BYTES = 65536
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class RequestHead:
    """What the access decision needs from a request: its path and headers (lower-case names)."""

    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ""

    @classmethod
    def parse(cls, head: bytes) -> RequestHead:
        """Parse leniently: an unreadable request gets an empty path, which needs the API key."""
        request_line, *lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        target = parts[1] if len(parts) == 3 else ""
        try:
            split = urlsplit(target if not target.startswith("/") else "http://host" + target)
        except ValueError:  # a broken target (an unclosed "[")
            split = urlsplit("")
        path, query = unquote(split.path if target else ""), split.query
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            name = name.strip().lower()
            if not colon or "_" in name:  # waitress drops names with "_" too (X_Api_Key is not X-Api-Key)
                continue
            value = value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value  # joined, as waitress does
        return cls(path, headers, query)


def json_response(status: int, body: object, retry_after: int | None = None,
                  headers: dict[str, str] | None = None, request_id: str = "") -> bytes:
    """A complete HTTP response with a JSON body."""
    data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    return http_response(status, "application/json", data, retry_after, headers, request_id)


def http_response(status: int, content_type: str, data: bytes, retry_after: int | None = None,
                  headers: dict[str, str] | None = None, request_id: str = "") -> bytes:
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
            f"Content-Type: {content_type}", f"Content-Length: {len(data)}"]
    if request_id:
        head.append(f"{REQUEST_ID_HEADER}: {request_id}")
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    head += ["Connection: close", "Server: gpt4all-api-supervisor"]
    return "\r\n".join([*head, "", ""]).encode("latin-1") + data


def error_response(error: ApiError, path: str = "", request_id: str = "") -> bytes:
    """`error` as a complete HTTP response, in the JSON shape a worker gives on `path`."""
    return json_response(error.status, error_body(path, error), headers=error.headers(), request_id=request_id)


def decide(request: RequestHead, client: str, access: AccessPolicy, unavailable: ApiError) -> bytes:
    """The answer for one request: the workers' refusal if they would refuse it; the metrics (the
    workers' files are all here); for /health, alive (the supervisor runs) unless it is the deep
    check, which no worker can run now; for /ready, the reason; else the 503. Each echoes the
    client's request id (or a new one)."""
    rid = request_id(request.headers.get("x-request-id"))
    try:
        access.check(client, request.path, request.headers.get("authorization"), request.headers.get("x-api-key"),
                     request.query)
    except ApiError as refusal:
        return error_response(refusal, request.path, rid)
    if request.path == METRICS_PATH:
        return http_response(200, CONTENT_TYPE, exposition(), request_id=rid)
    if request.path == DEEP_CHECK_PATH and not is_deep_check(request.path, request.query):
        return json_response(200, {"status": "live", "ready": False, "reason": unavailable.message}, request_id=rid)
    if request.path in (READY_PATH, DEEP_CHECK_PATH):
        return json_response(503, {"status": "unavailable", "reason": unavailable.message}, unavailable.retry_after,
                             request_id=rid)
    return error_response(unavailable, request.path, rid)


class FallbackResponder:
    def __init__(self, listener: socket.socket, access: AccessPolicy) -> None:
        self._listener = listener
        self._condition = threading.Condition()
        self._enabled = False
        self._closed = False
        self._access = access
        self._unavailable: ApiError = ServiceUnavailable("No worker can serve requests right now.")
        self.answered = 0
        self._thread = threading.Thread(target=self._run, name="fallback-503", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() or self._closed

    def set_access(self, access: AccessPolicy) -> None:
        """Apply reloaded access settings (API_KEY, AUTHORIZED_URLS, DOCS_PUBLIC)."""
        with self._condition:
            self._access = access

    def enable(self, reason: str, retry_after: int, code: str | None = None) -> None:
        with self._condition:
            self._unavailable = ServiceUnavailable(reason, retry_after=retry_after, code=code)
            self._enabled = True
            self._condition.notify_all()

    def disable(self) -> None:
        """After this returns, no connection is accepted here until enable()."""
        with self._condition:
            self._enabled = False

    def close(self) -> None:
        with self._condition:
            self._enabled = False
            self._closed = True
            self._condition.notify_all()
        self._thread.join(1.0)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._enabled and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
            try:
                readable, _, _ = select.select([self._listener], [], [], 0.2)
            except (OSError, ValueError):
                return  # the listener was closed
            if not readable:
                continue
            with self._condition:  # accept only while still enabled, under the lock disable() takes
                if not self._enabled:
                    continue
                try:
                    connection, address = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # a worker or another thread took it
                except OSError:
                    return
                access, unavailable = self._access, self._unavailable
            self.answered += 1
            threading.Thread(target=answer, args=(connection, str(address[0]), access, unavailable),
                             name="fallback-answer", daemon=True).start()


def answer(connection: socket.socket, client: str, access: AccessPolicy, unavailable: ApiError) -> None:
    """Read the request (so closing does not reset the connection before the client reads), answer, close."""
    with connection:
        connection.settimeout(READ_TIMEOUT)
        with contextlib.suppress(OSError):
            request = read_request(connection)
            response = decide(request, client, access, unavailable)
            meters().fallback_responses.labels(response[9:12].decode()).inc()
            connection.sendall(response)
            connection.shutdown(socket.SHUT_WR)
            connection.recv(1024)  # wait briefly for the client to close first


def read_request(connection: socket.socket) -> RequestHead:
    """Read the head and (up to a limit) the body, then parse the head."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_HEADER_BYTES:
        chunk = connection.recv(8192)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    remaining = min(_content_length(head), MAX_BODY_BYTES) - len(body)
    while remaining > 0:
        chunk = connection.recv(min(remaining, 65536))
        if not chunk:
            break
        remaining -= len(chunk)
    return RequestHead.parse(head)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return max(0, int(value.strip()))
    return 0
