"""Clients that speak HTTP on a raw socket, for what a library would not send."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


def assert_json_refusal(reply: RawReply, pid: int, status: int, code: str | None, mentions: str) -> None:
    """The usual error shape, tagged with the worker, and nothing of waitress's plain text."""
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json", reply
    assert reply.headers["x-worker-pid"] == str(pid)
    assert reply.headers.get("x-request-id"), "every answer carries a request id"
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and mentions in error["message"], error
    assert error["type"] == ("invalid_request_error" if status < 500 or status == 501 else "server_error")


def raw_exchange(port: int, request: bytes) -> RawReply:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(request)
        return read_reply(connection)


MAX_BODY = 1024 * 1024  # MAX_REQUEST_BYTES's default


@dataclass
class RawReply:
    status_line: str
    headers: dict[str, str]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])


def read_reply(connection: socket.socket) -> RawReply:
    """One HTTP response: the head, then Content-Length bytes of body (so a close by reset after it
    does not matter)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a whole response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = connection.recv(65536)
        assert chunk, "the connection closed in the middle of the body"
        body += chunk
    return RawReply(status_line, headers, body)


POST_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


EXPECT_TOO_LARGE = POST_HEAD + b"Expect: 100-continue\r\n" + f"Content-Length: {10 * MAX_BODY}\r\n\r\n".encode()
