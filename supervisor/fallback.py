"""A tiny responder that answers on the shared socket while no worker can.

When workers keep failing to start (a broken model file, say), a client connecting would wait in
the kernel's accept queue with no answer. Instead, while the arbiter says so, this thread accepts
those connections and answers every request with a 503 in the OpenAI error format, a
`Retry-After` header and a message that says why. It never races a worker: the arbiter enables it
only while no worker process that could accept exists or the accept gate keeps them all out
(api/accept_gate.py), and `disable()` returns only once no further `accept()` can happen, before
the arbiter spawns the next worker or opens the gate.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading

READ_TIMEOUT = 2.0
MAX_HEADER_BYTES = 65536
MAX_BODY_BYTES = 1 << 20


def unavailable_response(reason: str, retry_after: int) -> bytes:
    body = json.dumps({"error": {"message": reason, "type": "server_error", "param": None,
                                 "code": "service_unavailable"}}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Connection: close\r\n"
        "Server: gpt4all-api-supervisor\r\n\r\n"
    )
    return head.encode("latin-1") + body


class FallbackResponder:
    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._condition = threading.Condition()
        self._enabled = False
        self._closed = False
        self._response = b""
        self.answered = 0
        self._thread = threading.Thread(target=self._run, name="fallback-503", daemon=True)
        self._thread.start()

    def enable(self, reason: str, retry_after: int) -> None:
        with self._condition:
            self._response = unavailable_response(reason, retry_after)
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
                    connection, _address = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # a worker or another thread took it
                except OSError:
                    return
                response = self._response
            self.answered += 1
            threading.Thread(target=answer, args=(connection, response), name="fallback-answer", daemon=True).start()


def answer(connection: socket.socket, response: bytes) -> None:
    """Read the request (so closing does not reset the connection before the client reads), answer, close."""
    with connection:
        connection.settimeout(READ_TIMEOUT)
        with contextlib.suppress(OSError):
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
            connection.sendall(response)
            connection.shutdown(socket.SHUT_WR)
            connection.recv(1024)  # wait briefly for the client to close first


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return max(0, int(value.strip()))
    return 0
