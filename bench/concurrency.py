"""Throughput and latency as parallel clients grow (1, 2, 4, 8), for three ways to spend 2 cores:
one worker on one thread (the baseline), one worker on two threads, two workers on one thread each.

Requests are short (a chat reply of SHORT_REPLY tokens), so what is measured is how well the
daemon spreads work, not how fast one long generation decodes. Workers are not restarted after
each request here (RESTART_AFTER_REQUESTS=0): the cost of restarts is a scenario of its own. The
warm spare stays on, as it ships: it may take a client, but it waits for one of the WORKERS
inference slots (api.inference_slots), so each layout runs as many generations as its name says."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass

from bench.daemon import StartDaemon
from bench.measure import Sample, post_json

CLIENTS = (1, 2, 4, 8)
SHORT_REPLY = 16
LAYOUTS = {"1 worker x 1 thread": (1, 1), "1 worker x 2 threads": (1, 2), "2 workers x 1 thread": (2, 1)}
BODY = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": SHORT_REPLY}


@dataclass(frozen=True)
class Level:
    clients: int
    requests_per_second: float
    latencies: Sample
    failures: int

    def row(self) -> dict[str, float]:
        return {"requests_per_second": round(self.requests_per_second, 2),
                "p50_ms": round(self.latencies.percentile(0.50) * 1000, 1),
                "p95_ms": round(self.latencies.percentile(0.95) * 1000, 1),
                "p99_ms": round(self.latencies.percentile(0.99) * 1000, 1),
                "failures": self.failures}


def load(port: int, clients: int, requests_per_client: int) -> Level:
    """`clients` threads each send `requests_per_client` requests back to back."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal failures
        for _ in range(requests_per_client):
            try:
                status, _body, seconds, _worker = post_json(port, "/v1/chat/completions", BODY)
            except (OSError, http.client.HTTPException):  # refused, reset or cut short: a failure
                status, seconds = 0, 0.0
            with lock:
                if status == 200:
                    latencies.append(seconds)
                else:
                    failures += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return Level(clients, len(latencies) / elapsed, Sample(latencies or [0.0]), failures)


def run(start: StartDaemon, requests_per_client: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for layout, (workers, threads) in LAYOUTS.items():
        with start(WORKERS=workers, N_THREADS=threads, RESTART_AFTER_REQUESTS=0) as service:
            load(service.port, 1, 2)  # warm the page cache
            for clients in CLIENTS:
                level = load(service.port, clients, requests_per_client)
                results[f"{layout}, {clients} client(s)"] = level.row()
    for name, row in results.items():
        clients = name.rsplit(", ", 1)[1]
        for layout, column in (("1 worker x 1 thread", "vs_1x1"), ("1 worker x 2 threads", "vs_1x2")):
            reference = results[f"{layout}, {clients}"]["requests_per_second"]
            row[column] = round(row["requests_per_second"] / reference, 3) if reference else 0.0
    return results
