"""What a fresh model for every request costs: sequential requests with RESTART_AFTER_REQUESTS=1
against the same requests with RESTART_AFTER_REQUESTS=0 (one worker serves them all).

The daemons run side by side and take turns, a block of requests each, so a slow phase of a shared
machine hits them alike. With restarts on, the daemon by itself leaves one core for the loading
replacement (api.config), so on a small machine the two defaults differ in threads as well; each
setting also runs on the other's threads, which separates the two effects."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from bench.daemon import StartDaemon, threads_chosen_by_daemon
from bench.measure import post_json
from testing.servers import Service

BODY = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 16}
PAUSE_BETWEEN_BLOCKS = 1.0  # a replacement finishes loading before the next daemon's turn


@dataclass(frozen=True)
class Setup:
    restart_after: int
    threads: int

    @property
    def label(self) -> str:
        restarts = "restart every request" if self.restart_after else "never restart"
        return f"{restarts}, {self.threads} thread(s)"


def setups(threads: int | None) -> list[Setup]:
    """Each restart setting on the daemon's own choice of threads and on the other's: on 2 cores,
    never restart on 2 threads (its default) and 1, restart every request on 1 (its default) and 2."""
    if threads:
        return [Setup(0, threads), Setup(1, threads)]
    never, restarting = (threads_chosen_by_daemon(RESTART_AFTER_REQUESTS=n) for n in (0, 1))
    return list(dict.fromkeys([Setup(0, never), Setup(0, restarting), Setup(1, restarting), Setup(1, never)]))


def run(start: StartDaemon, threads: int | None, requests: int,
        rounds: int) -> dict[str, dict[str, float]]:
    chosen = setups(threads)
    per_block = max(1, requests // rounds)
    seconds = {setup: 0.0 for setup in chosen}
    workers: dict[Setup, set[str]] = {setup: set() for setup in chosen}
    with contextlib.ExitStack() as stack:
        services = {setup: stack.enter_context(start(RESTART_AFTER_REQUESTS=setup.restart_after, N_THREADS=setup.threads))
                    for setup in chosen}
        for service in services.values():
            send_sequentially(service, 2)  # warm-up: page cache, fork server
        for _ in range(rounds):
            for setup, service in services.items():
                time.sleep(PAUSE_BETWEEN_BLOCKS)
                started = time.perf_counter()
                workers[setup] |= send_sequentially(service, per_block)
                seconds[setup] += time.perf_counter() - started
    return rows(chosen, seconds, workers, per_block * rounds)


def send_sequentially(service: Service, count: int) -> set[str]:
    """Send `count` requests one after another; return the pids of the workers that answered."""
    answered_by = set()
    for _ in range(count):
        reply = post_json(service.port, "/v1/chat/completions", BODY)
        assert reply.status == 200, reply.body
        answered_by.add(reply.worker)
    return answered_by


def rows(chosen: list[Setup], seconds: dict[Setup, float], workers: dict[Setup, set[str]],
         requests: int) -> dict[str, dict[str, float]]:
    """Throughput of each setup, against never-restart on the same threads and on the daemon's default ones."""
    rate = {setup: requests / seconds[setup] for setup in chosen}
    never_default = rate[chosen[0]]
    table = {}
    for setup in chosen:
        same_threads = next(rate[s] for s in chosen if s.restart_after == 0 and s.threads == setup.threads)
        table[setup.label] = {"threads": setup.threads, "requests": requests, "seconds": round(seconds[setup], 2),
                              "requests_per_second": round(rate[setup], 2), "worker_processes": len(workers[setup]),
                              "vs_never_same_threads": round(rate[setup] / same_threads, 3),
                              "vs_never_default": round(rate[setup] / never_default, 3)}
    return table
