"""What the bounded line for an inference slot (MAX_QUEUE) gives clients, and what it costs.

- Beyond the limit: while a long generation holds the only slot and the line is full, how long a
  further client waits for its 503, when a worker refuses it (a spare takes it, the line is full)
  and when the supervisor does (every worker is generating or holds a waiting client). Baseline:
  the same client on a daemon without MAX_QUEUE, which waits until the slot is free.
- The cost per request: taking a place and the slot and giving them back, in process, with no
  contention (what every inference request pays, limit or not); and 1-token requests over HTTP to
  daemons with and without MAX_QUEUE, in turns.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.daemon import StartDaemon
from bench.measure import Sample, interleave, post_json
from testing.servers import Service

ONE_TOKEN = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 1}
HOLDING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10", "max_tokens": 100000, "temperature": 0}  # until the client leaves
EXTRA = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 8}
REFUSALS = 30


def run(start: StartDaemon, refusals: int, runs: int) -> dict[str, dict[str, float]]:
    return {
        "refused by a worker (line full)": refused(start, refusals, MAX_QUEUE=0, WARM_SPARES=1),
        "refused by the supervisor (workers all taken)": refused(start, refusals, MAX_QUEUE=1, WARM_SPARES=1, waiters=1),
        "no MAX_QUEUE: the same client waits": unbounded_wait(start),
        "queue bookkeeping in process": bookkeeping(2000),
        "1-token request, MAX_QUEUE=4 against none": http_cost(start, runs),
    }


class Holder:
    """Sends a streamed generation on a connection of its own, kept until `close()`: while it runs
    it holds the slot; before, it waits in line."""

    def __init__(self, service: Service) -> None:
        self.socket = socket.create_connection(("127.0.0.1", service.port), timeout=300)
        body = json.dumps({**HOLDING, "stream": True}).encode()
        self.socket.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def generating(self) -> Holder:
        assert self.socket.recv(4096).startswith(b"HTTP/1.1 200")
        return self

    def close(self) -> None:
        self.socket.close()


def refused(start: StartDaemon, count: int, *, waiters: int = 0, **settings: object) -> dict[str, float]:
    with start(RESTART_AFTER_REQUESTS=0, WORKERS=1, **settings) as service:
        holders = [Holder(service).generating()]
        holders += [Holder(service) for _ in range(waiters)]  # each waits inside a spare, in line for the slot
        service.wait_for(lambda: len(list(service.run_dir.glob("queue-*.ticket"))) == waiters, 30, "the waiters")
        if waiters:  # the supervisor has seen them: from now on it answers newcomers
            service.wait_for(lambda: "overloaded: newcomers get 503" in service.log(), 30, "the overload noticed")
        try:
            replies = [post_json(service.port, "/v1/chat/completions", EXTRA) for _ in range(count)]
        finally:
            for holder in holders:
                holder.close()
    assert all(reply.status == 503 for reply in replies), [reply.status for reply in replies]
    sample = Sample([reply.seconds for reply in replies])
    by_supervisor = sum(1 for reply in replies if not reply.worker)
    return {"p50_ms": round(sample.median * 1000, 2), "p95_ms": round(sample.percentile(0.95) * 1000, 2),
            "max_ms": round(max(sample.values) * 1000, 2), "answered_by_supervisor": by_supervisor, "requests": count}


def unbounded_wait(start: StartDaemon, hold_seconds: float = 3.0) -> dict[str, float]:
    """Without a limit the extra client waits for the slot: here for as long as the holder keeps it."""
    with start(RESTART_AFTER_REQUESTS=0, WORKERS=1, WARM_SPARES=1) as service:
        holder = Holder(service).generating()
        threading.Timer(hold_seconds, holder.close).start()
        reply = post_json(service.port, "/v1/chat/completions", EXTRA)
    return {"p50_ms": round(reply.seconds * 1000, 1), "status": reply.status, "slot_held_s": hold_seconds}


def bookkeeping(count: int) -> dict[str, float]:
    """Admit, take the slot, give it back: the line's own work per request, uncontended."""
    from api.inference_slots import InferenceSlots

    with tempfile.TemporaryDirectory(prefix="bench-queue-") as folder:
        slots = InferenceSlots(Path(folder), 1, max_queue=4, queue_timeout=60)
        started = time.perf_counter()
        for _ in range(count):
            slots.admit().wait()()
        per_request = (time.perf_counter() - started) / count
    return {"per_request_us": round(per_request * 1e6, 1), "target_us": 1000, "requests": count}


def http_cost(start: StartDaemon, runs: int) -> dict[str, float]:
    with start(RESTART_AFTER_REQUESTS=0, MAX_QUEUE=4) as bounded, start(RESTART_AFTER_REQUESTS=0) as unbounded:
        with_limit, without = interleave(runs, lambda: one_token(bounded), lambda: one_token(unbounded))
    return {"with_ms": round(with_limit.median * 1000, 1), "without_ms": round(without.median * 1000, 1),
            "added_ms": round((with_limit.median - without.median) * 1000, 1),
            "spread_ms": round(statistics.pstdev(without.values) * 1000, 1), "runs": runs}


def one_token(service: Service) -> float:
    reply = post_json(service.port, "/v1/chat/completions", ONE_TOKEN)
    assert reply.status == 200, reply.body
    return reply.seconds
