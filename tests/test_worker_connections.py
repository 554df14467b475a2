"""Clients that keep connections open, against real workers on real sockets: kept-alive clients
taking turns with a new one, and a request sent on a kept-alive connection at the instant its worker
drains (answered, or cleanly refused, never reset)."""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.test_supervisor_e2e import Service
from tests.test_supervisor_e2e import start_service as start_service  # the fixture, shared
from tests.test_worker_protocol import Worker
from tests.test_worker_protocol import start_worker as start_worker  # the fixture, shared

COMPLETION = {"prompt": "count 0", "max_tokens": 1500, "temperature": 0}  # a quarter of a second each
GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"


def read_response_head(connection: socket.socket) -> bytes:
    """The status line and headers of one response (its body read and dropped), or b"" if the
    worker closed the connection cleanly without answering. A reset raises ConnectionResetError."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


# -- kept-alive clients take turns with new ones


def test_two_kept_alive_clients_taking_turns_do_not_shut_out_a_new_one(start_service: Callable[..., Service]) -> None:
    """One worker, never restarted: two clients on kept-alive connections (the `openai` package's
    default) send their requests so that one is always running. A third client on a new
    connection must get its turn."""
    service = start_service(WORKERS=1, WARM_SPARES=0, RESTART_AFTER_REQUESTS=0)
    statuses: dict[str, list[int]] = {"first": [], "second": []}
    stop = threading.Event()

    def keep_asking(name: str) -> None:
        session = requests.Session()
        while not stop.is_set():
            statuses[name].append(session.post(service.url + "/v1/completions", json=COMPLETION, timeout=30).status_code)

    threads = [threading.Thread(target=keep_asking, args=(name,), daemon=True) for name in statuses]
    for thread in threads:
        thread.start()
    try:
        service.wait_for(lambda: all(len(done) >= 3 for done in statuses.values()), 30, "both kept-alive clients")
        try:
            newcomer = requests.post(service.url + "/v1/completions", json=COMPLETION, timeout=20)
        except requests.Timeout:
            pytest.fail("a client on a new connection got no answer in 20 s while two kept-alive clients took turns")
        count = {name: len(done) for name, done in statuses.items()}
        service.wait_for(lambda: all(len(statuses[name]) > count[name] for name in statuses), 30,
                         "both kept-alive clients to go on being served")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert newcomer.status_code == 200, newcomer.text
    assert {status for done in statuses.values() for status in done} == {200}


# -- a request on a kept-alive connection at the instant the worker drains


def test_a_request_arriving_as_the_worker_drains_is_answered_or_cleanly_closed_never_reset(
        start_worker: Callable[..., Worker]) -> None:
    """A draining worker closes its idle kept-alive connections. A request that reaches one of
    them at that instant must be answered, or meet a connection closed before it was read (end of
    file: the client knows it was not processed and may retry); a reset loses the request without
    saying so. Requests go out on 90 kept-alive connections, 0.2 ms apart, with the drain command
    sent between them; the race is narrow, so several rounds."""
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(6):
        worker = start_worker(restart_after=0)
        worker.wait_state("READY")
        connections: list[socket.socket] = []
        try:
            for _ in range(90):  # one after another: with a client waiting, a response would close its connection
                connections.append(socket.create_connection(("127.0.0.1", worker.port), timeout=10))
                connections[-1].sendall(GET_MODELS)
                head = read_response_head(connections[-1])
                assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head, head
            time.sleep(0.2)
            for index, connection in enumerate(connections):
                if index == 5:
                    worker.send("drain the test says so")
                connection.sendall(GET_MODELS)
                _spin(0.0002)
            for connection in connections:
                outcomes[_outcome(connection)] += 1
            assert worker.process.wait(10) is not None
        finally:
            for connection in connections:
                connection.close()
    print(f"requests sent as the worker drained: {dict(outcomes)}")
    assert set(outcomes) <= {"answered", "closed before it was read"}, dict(outcomes)


def _outcome(connection: socket.socket) -> str:
    try:
        head = read_response_head(connection)
    except ConnectionResetError:
        return "reset"
    if not head:
        return "closed before it was read"
    status_line = head.split(b"\r\n")[0]
    return "answered" if status_line.startswith(b"HTTP/1.1 200") else f"answered {status_line!r}"


def _spin(seconds: float) -> None:
    """Wait this long without sleeping (a sleep lasts far longer than 0.2 ms)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass
