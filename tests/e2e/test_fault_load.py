"""Fault and load: four clients keep the real supervisor busy while its workers are SIGKILLed and
SIGSTOPped, with restart per request and without, on kept-alive and on fresh connections.

The clients mix the original route, chat (plain and streamed) and embeddings on raw
`http.client` connections, so the test knows the local port of every connection. Each request
ends in one of:
- answered: 200 with exactly the tiny model's reply;
- a clean error: a JSON error with a status the service may give under faults (503 with
  Retry-After, 504), or a stream that reports such an error in-band;
- lost: reset, empty reply, timeout, or a body cut short;
- wrong: anything else (a 500, a wrong reply, a stream that ends without [DONE] or an error).

Before a fault the victim is frozen (SIGSTOP), the client ports of the connections it holds on the
public socket are read from the kernel, and only then is it killed (SIGKILL) or left frozen for the
supervisor to find. What is asserted, exactly: nothing is wrong, and every lost request went over a
connection that a victim held at the moment it was killed or stopped. Everything else must be
answered or a clean error. The counts per scenario are printed in the terminal summary.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import pytest

from api.protocol import WorkerState
from testing.servers import Service, gone
from testing.summary import FAULT_LOAD_COUNTS
from testing.tiny_models import TINY_CHAT_REPLY, TINY_EMBEDDING_DIM

CLIENTS = 4
CLIENT_TIMEOUT = 15.0
"""Seconds a client waits for each read: longer than the supervisor takes to replace a frozen worker."""
LOAD_BETWEEN_FAULTS = 0.8
"""Seconds of load before each fault, and after the last one."""
FAULTS = (("SIGKILL", "busy"), ("SIGSTOP", "busy"), ("SIGKILL", "idle"), ("SIGSTOP", "idle"))
"""Each scenario's faults, in order: which signal, and to a worker generating (busy) or READY (idle)."""
POOL = {"WORKERS": 2, "WARM_SPARES": 1}
CLEAN_ERROR_STATUSES = frozenset({503, 504})
"""What the service may answer under faults: no worker can serve now, or a generation timed out."""

CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}


# -- what the clients send, and what counts as the right answer


def _plain_reply(body: bytes) -> str:
    return "" if body.decode(errors="replace") == TINY_CHAT_REPLY else f"reply {body[:80]!r}"


def _chat_reply(body: bytes) -> str:
    content = json.loads(body)["choices"][0]["message"]["content"]
    return "" if content == TINY_CHAT_REPLY else f"reply {content[:80]!r}"


def _embedding(body: bytes) -> str:
    vector = json.loads(body)["data"][0]["embedding"]
    return "" if len(vector) == TINY_EMBEDDING_DIM else f"a vector of {len(vector)} numbers"


def stream_events(body: bytes) -> list[str]:
    return [line[len("data: "):] for line in body.decode(errors="replace").splitlines() if line.startswith("data: ")]


def _streamed_chat(body: bytes) -> str:
    events = stream_events(body)
    if events[-1:] != ["[DONE]"]:
        return f"a stream that ends with {events[-1:]}"
    content = "".join(json.loads(event)["choices"][0]["delta"].get("content", "") for event in events[:-1])
    return "" if content == TINY_CHAT_REPLY else f"streamed reply {content[:80]!r}"


@dataclass(frozen=True)
class Call:
    name: str
    path: str
    body: dict[str, object]
    wrong_answer: Callable[[bytes], str]  # what is wrong with a 200's body, '' if nothing


CALLS = (
    Call("original", "/gpt4all_api", {"prompt": "Hello!", "temp": 0}, _plain_reply),
    Call("chat", "/v1/chat/completions", CHAT, _chat_reply),
    Call("chat stream", "/v1/chat/completions", {**CHAT, "stream": True}, _streamed_chat),
    Call("embeddings", "/v1/embeddings", {"input": "hello world"}, _embedding),
)


# -- one request's fate


@dataclass(frozen=True)
class Link:
    """One TCP connection of a client: its local port, and when it started connecting."""

    port: int
    opened_at: float


@dataclass
class Record:
    client: int
    call: str
    link: Link | None
    started_at: float
    ended_at: float = 0.0
    kind: str = ""  # answered, clean error, lost, wrong
    detail: str = ""  # how it was lost, or what was wrong
    status: int | None = None
    worker: str | None = None  # X-Worker-Pid

    def __str__(self) -> str:
        where = f"port {self.link.port}" if self.link else "no connection"
        return (f"client {self.client} {self.call} on {where}, {self.started_at:.2f}-{self.ended_at:.2f}: "
                f"{self.kind} {self.detail} (status {self.status}, worker {self.worker})")


def is_json_error(body: bytes) -> bool:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return isinstance(json.loads(body)["error"]["message"], str)
    return False


def judge(call: Call, status: int, headers: http.client.HTTPMessage, body: bytes) -> tuple[str, str]:
    """(kind, detail) of a complete response."""
    if status in CLEAN_ERROR_STATUSES and is_json_error(body):
        if status == 503 and not headers.get("Retry-After"):
            return "wrong", "a 503 without Retry-After"
        return "clean error", str(status)
    if status != 200:
        return "wrong", f"status {status}: {body[:200]!r}"
    if call.name == "chat stream":
        errors = [event for event in stream_events(body) if event.startswith('{"error"')]
        if errors:  # headers were sent when it failed: OpenAI's in-band error
            code = json.loads(errors[0])["error"].get("code")
            return ("clean error", f"in-band {code}") if code in {"timeout", "service_unavailable"} else \
                ("wrong", f"in-band error {errors[0][:200]}")
    try:
        problem = call.wrong_answer(body)
    except (ValueError, KeyError, IndexError, TypeError) as error:
        problem = f"unreadable body ({error!r}): {body[:200]!r}"
    return ("wrong", problem) if problem else ("answered", "")


# -- the clients


def dropped(sock: object) -> bool:
    """What urllib3 checks before it reuses a kept-alive connection: readable means closed (or junk)."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class Client:
    """One client: sends CALLS in turn, from its own offset, on one kept-alive connection (opened
    again when the server closes it or it was found dropped) or on a fresh one per request."""

    def __init__(self, index: int, port: int, keep_alive: bool, clock: Callable[[], float]) -> None:
        self.index = index
        self.port = port
        self.keep_alive = keep_alive
        self.clock = clock
        self.connection: http.client.HTTPConnection | None = None
        self.link: Link | None = None
        self.records: list[Record] = []

    def run(self, stop: threading.Event) -> None:
        for n in itertools.count(self.index):
            if stop.is_set():
                break
            self.records.append(self.exchange(CALLS[n % len(CALLS)]))
        self._close()

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = self.link = None

    def _connect(self) -> Link:
        reusable = self.connection is not None and self.connection.sock is not None and not dropped(self.connection.sock)
        if self.keep_alive and reusable and self.link is not None:
            return self.link
        self._close()
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        opened_at = self.clock()
        self.connection.connect()
        self.link = Link(self.connection.sock.getsockname()[1], opened_at)
        return self.link

    def exchange(self, call: Call) -> Record:
        record = Record(self.index, call.name, None, self.clock())
        try:
            record.link = self._connect()
            assert self.connection is not None
            self.connection.request("POST", call.path, body=json.dumps(call.body),
                                    headers={"Content-Type": "application/json"})
            response = self.connection.getresponse()
            record.status, record.worker = response.status, response.headers.get("X-Worker-Pid")
            body = response.read()
            record.kind, record.detail = judge(call, response.status, response.headers, body)
        except http.client.RemoteDisconnected:  # before it is a ConnectionResetError
            record.kind, record.detail = "lost", "empty reply"
        except http.client.IncompleteRead:
            record.kind, record.detail = "lost", "cut short"
        except ConnectionRefusedError:
            record.kind, record.detail = "lost", "refused"
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            record.kind, record.detail = "lost", "reset"
        except TimeoutError:
            record.kind, record.detail = "lost", "timeout"
        except (http.client.HTTPException, OSError) as error:
            record.kind, record.detail = "wrong", repr(error)
        record.ended_at = self.clock()
        if record.kind == "lost" or not self.keep_alive:
            self._close()
        return record


# -- the faults


@dataclass
class Victim:
    pid: int
    signal: str
    target: str
    at: float = 0.0
    ports: set[int] = field(default_factory=set)  # client ports of its connections on the public socket

    def __str__(self) -> str:
        article = "an" if self.target == "idle" else "a"
        return (f"{self.signal} of {article} {self.target} worker at {self.at:.2f} s (pid {self.pid}, "
                f"{len(self.ports)} connection(s))")


def is_target(service: Service, pid: int, target: str) -> bool:
    sentinel = service.sentinels().get(pid)
    if sentinel is None:
        return False
    return sentinel.generating if target == "busy" else sentinel.state is WorkerState.READY and not sentinel.generating


def client_ports_held(pid: int, public_port: int) -> set[int]:
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return {c.raddr.port for c in connections
            if c.laddr.port == public_port and c.raddr and c.status == psutil.CONN_ESTABLISHED}


def freeze(pid: int) -> None:
    """SIGSTOP, and wait until the kernel says it is stopped: kill() returns before the signal takes
    effect, and a worker still running on the other core could accept a client or rewrite its sentinel."""
    os.kill(pid, signal.SIGSTOP)
    process = psutil.Process(pid)
    deadline = time.monotonic() + 5
    while (status := process.status()) != psutil.STATUS_STOPPED:
        if status == psutil.STATUS_ZOMBIE:
            raise psutil.ZombieProcess(pid)  # it exited meanwhile: not a victim
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.001)


def inject(service: Service, signal_name: str, target: str, clock: Callable[[], float], timeout: float = 10) -> Victim:
    """Freeze a worker that is `target`, note the connections it holds, then SIGKILL it or leave
    it frozen. A worker that stopped being `target` before it froze is let go on (SIGCONT)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = {worker.pid for worker in service.workers()}
        for pid in (pid for pid in workers if is_target(service, pid, target)):
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                freeze(pid)
                victim = Victim(pid, signal_name, target, clock())
                if not is_target(service, pid, target):  # its last sentinel, now that it cannot write another
                    os.kill(pid, signal.SIGCONT)
                    continue
                victim.ports = client_ports_held(pid, service.port)
                if signal_name == "SIGKILL":
                    os.kill(pid, signal.SIGKILL)
                return victim
        time.sleep(0.005)
    raise AssertionError(f"no {target} worker to {signal_name} within {timeout} s\n{service.log()[-3000:]}")


def lost_on_a_victim(record: Record, victims: list[Victim]) -> bool:
    """The request's connection was open, and held by the victim, when the victim was hit."""
    link = record.link
    return link is not None and any(  # (times are taken before connect() and after SIGSTOP: never too late)
        link.port in victim.ports and link.opened_at < victim.at <= record.ended_at for victim in victims)


# -- the counts


LOST_HOW = ("reset", "empty reply", "timeout", "cut short", "refused")
COLUMNS = ("requests", "answered", "clean errors", "lost", "on victims", *LOST_HOW, "wrong")


def counts(records: list[Record], victims: list[Victim]) -> dict[str, int]:
    lost = [record for record in records if record.kind == "lost"]
    kinds = {how: sum(1 for record in lost if record.detail == how) for how in LOST_HOW}
    return {
        "requests": len(records),
        "answered": sum(1 for record in records if record.kind == "answered"),
        "clean errors": sum(1 for record in records if record.kind == "clean error"),
        "lost": len(lost),
        "on victims": sum(1 for record in lost if lost_on_a_victim(record, victims)),
        **kinds,
        "wrong": sum(1 for record in records if record.kind == "wrong"),
    }


def table_lines(scenario: str, numbers: dict[str, int], first: bool) -> list[str]:
    widths = [max(len(column), 5) for column in COLUMNS]
    cells = " ".join(f"{numbers[column]:>{width}}" for column, width in zip(COLUMNS, widths, strict=True))
    header = " ".join(f"{column:>{width}}" for column, width in zip(COLUMNS, widths, strict=True))
    return ([f"{'scenario':<31} {header}"] if first else []) + [f"{scenario:<31} {cells}"]


def report(config: pytest.Config, scenario: str, records: list[Record], victims: list[Victim]) -> None:
    """Add this scenario's counts to the terminal summary (conftest.py) and print them (-s)."""
    lines = config.stash.setdefault(FAULT_LOAD_COUNTS, [])
    new = table_lines(scenario, counts(records, victims), first=not lines)
    lines.extend(new)
    print("\n" + "\n".join([*new, f"  faults: {', '.join(str(victim) for victim in victims)}"]))


# -- the scenarios


SCENARIOS = [
    pytest.param(1, False, id="restart-per-request-fresh"),
    pytest.param(1, True, id="restart-per-request-keep-alive"),
    pytest.param(0, False, id="never-restart-fresh"),
    pytest.param(0, True, id="never-restart-keep-alive"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("restart_after", "keep_alive"), SCENARIOS)
def test_under_load_only_requests_in_flight_on_a_killed_or_stopped_worker_are_lost(
        start_service: Callable[..., Service], request: pytest.FixtureRequest, restart_after: int,
        keep_alive: bool) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=restart_after, **POOL)
    service.wait_for(lambda: service.ready_count() >= 3, 20, "3 ready workers")
    origin = time.monotonic()

    def clock() -> float:  # seconds into the scenario, for readable failures
        return time.monotonic() - origin

    clients = [Client(index, service.port, keep_alive, clock) for index in range(CLIENTS)]
    stop = threading.Event()
    threads = [threading.Thread(target=client.run, args=(stop,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    victims: list[Victim] = []
    try:
        for signal_name, target in FAULTS:
            time.sleep(LOAD_BETWEEN_FAULTS)
            victim = inject(service, signal_name, target, clock)
            victims.append(victim)
            service.wait_for(lambda victim=victim: gone(victim.pid), 20, f"the end of {victim}")
        time.sleep(LOAD_BETWEEN_FAULTS)
    finally:
        stop.set()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT + 5)
    assert not any(thread.is_alive() for thread in threads), "every client ended its last request"
    records = sorted((record for client in clients for record in client.records), key=lambda r: r.started_at)
    report(request.config, request.node.callspec.id, records, victims)

    assert [str(record) for record in records if record.kind == "wrong"] == []
    stray = [str(record) for record in records if record.kind == "lost" and not lost_on_a_victim(record, victims)]
    assert stray == [], f"lost, but not in flight on a victim ({', '.join(map(str, victims))}); the supervisor " \
                        f"said: {[line for line in service.log().splitlines() if 'seems hung' in line]}"
    frozen = [victim for victim in victims if victim.signal == "SIGSTOP"]
    assert all(f"(pid {victim.pid}) seems hung" in service.log() for victim in frozen), "the supervisor found the frozen"
    last_hit = victims[-1].at
    assert any(record.kind == "answered" and record.started_at > last_hit for record in records), \
        "the service answers again after the last fault"
