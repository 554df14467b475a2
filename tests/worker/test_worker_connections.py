"""Clients that keep connections open, against real workers on real sockets: kept-alive clients
taking turns, connections that never send a request (a slowloris), and a request sent on a
kept-alive connection at the instant its worker drains. Every client that sends a request is
served in its turn, and none is reset."""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from testing.servers import Service, Worker

COMPLETION = {"prompt": "count 0", "max_tokens": 1500, "temperature": 0}  # a quarter of a second each
GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"


@contextlib.contextmanager
def silent_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that never complete a request, as a slowloris opens them: every other
    one sends nothing at all, the others the start of a request head and then nothing more."""
    connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for connection in connections[1::2]:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n")
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


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


# -- connections that never send a request


def test_silent_connections_do_not_delay_a_client_that_sends_a_request(start_service: Callable[..., Service]) -> None:
    """Each silent connection used to hold the only worker for FRESH_CONNECTION_GRACE (1 s), one
    after another: 30 of them would keep the client behind them waiting for 30 s."""
    service = start_service(WORKERS=1, WARM_SPARES=0, RESTART_AFTER_REQUESTS=0)
    with silent_connections(service.port, 30):
        waited = seconds_to_be_answered(service)
    assert waited < 8, f"30 silent connections held the worker for {waited:.1f} s"


def test_more_silent_connections_than_a_worker_holds_do_not_shut_out_a_client(
        start_service: Callable[..., Service]) -> None:
    """Past waitress's connection limit (100) a worker accepts nothing more. A slowloris that
    fills it must not keep a client that sends a request waiting until the silent ones time out:
    the worker closes the silent connections that have had their chance."""
    service = start_service(WORKERS=1, WARM_SPARES=0, RESTART_AFTER_REQUESTS=0)
    with silent_connections(service.port, 120) as silent:
        time.sleep(2)  # every silent connection accepted or waiting, and past its grace
        waited = seconds_to_be_answered(service)
        closed = sum(1 for connection in silent if _closed_cleanly(connection))
    assert waited < 8, f"a full worker kept the client waiting {waited:.1f} s"
    assert closed >= 1, "the worker made room by closing silent connections"


def seconds_to_be_answered(service: Service, timeout: float = 30) -> float:
    """How long a client that sends a chat request waits for its (successful) answer."""
    started = time.monotonic()
    try:
        response = service.chat(timeout=timeout)
    except requests.Timeout:
        pytest.fail(f"a client that sent its request got no answer in {timeout:g} s")
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def _closed_cleanly(connection: socket.socket) -> bool:
    """True if the worker closed this connection with a FIN (end of file), False if it is open."""
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False


# -- a request on a kept-alive connection at the instant the worker drains


def test_a_request_arriving_as_the_worker_drains_is_answered_or_cleanly_closed_never_reset(
        supervised_worker: Callable[..., Worker]) -> None:
    """A draining worker closes its idle kept-alive connections. A request that reaches one of
    them at that instant must be answered, or meet a connection closed before it was read (end of
    file: the client knows it was not processed and may retry); a reset loses the request without
    saying so. Requests go out on 90 kept-alive connections, 0.2 ms apart, with the drain command
    sent between them; the race is narrow, so several rounds."""
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(6):
        worker = supervised_worker(restart_after=0)
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
