"""Small measuring tools shared by the scenarios."""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Sample:
    """The values (seconds, or a rate) of repeated runs of one thing."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


SETTLE_SECONDS = 0.25


def interleave(runs: int, *actions: Callable[[], float]) -> list[Sample]:
    """Run the actions in turn, so slow phases of a noisy machine hit each of them alike.

    Before each action the machine gets a moment to settle: llama.cpp's worker threads keep
    spinning for a while after a generation, and in another process they would steal the cores
    the next action needs (measured: +100-200 ms on 2 cores without the pause).
    """
    results: list[list[float]] = [[] for _ in actions]
    for _ in range(runs):
        for index, action in enumerate(actions):
            time.sleep(SETTLE_SECONDS)
            results[index].append(action())
    return [Sample(values) for values in results]


class Reply(NamedTuple):
    status: int
    body: dict
    seconds: float
    worker: str  # the X-Worker-Pid header: which process answered


def post_json(port: int, path: str, body: dict) -> Reply:
    """POST on a fresh connection, as a restart-per-request daemon sees clients."""
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return Reply(response.status, json.loads(data), elapsed, response.getheader("X-Worker-Pid", ""))


def first_streamed_token(port: int, path: str, body: dict) -> tuple[float, float, int]:
    """Stream a request; return (seconds to the first content event, total seconds, content events)."""
    payload = json.dumps({**body, "stream": True}).encode()
    started = time.perf_counter()
    first: float | None = None
    events = 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            choice = (event.get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content") or choice.get("text"):
                events += 1
                first = first or time.perf_counter()
        total = time.perf_counter() - started
    finally:
        connection.close()
    return (first or total) - started, total, events
