"""What /metrics and JSON logs cost per request, and what a scrape costs after many dead workers.

Measured in a child process of its own (the metrics' multiprocess mode is process-wide), on a
fresh metrics folder:
- instrumentation: the metric updates one generation request makes (its count, duration, tokens,
  time to first token and queue wait) against the same loop without them;
- JSON logs: an access-log line formatted as JSON against the same line as text;
- the scrape: GET /metrics' exposition after DEAD workers each left their files, before and after
  the supervisor's compaction.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DEAD = 500


def per_call_us(work: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - started) / calls * 1e6


def best_of(work: Callable[[], object], calls: int, rounds: int = 5) -> float:
    return min(per_call_us(work, calls) for _ in range(rounds))


def measure(calls: int, dead: int) -> dict[str, dict[str, float]]:
    folder = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    from prometheus_client import values

    from api import metrics
    from api.request_log import JsonFormatter, RequestRecord

    fake_pid = [os.getpid()]
    real_value_class = values.MultiProcessValue
    values.MultiProcessValue = lambda: real_value_class(lambda: fake_pid[0])  # each "worker" writes files of its own
    metrics.metrics_folder = lambda: folder  # type: ignore[assignment]
    meters = metrics.meters()

    def bare() -> RequestRecord:
        return RequestRecord("id", "POST", "/v1/chat/completions", "openai_chat", status=200,
                             prompt_tokens=20, completion_tokens=8)

    def instrumented() -> RequestRecord:
        record = bare()
        meters.requests.labels(record.route, "200", record.wire_format).inc()
        meters.request_seconds.labels(record.wire_format).observe(0.2)
        meters.prompt_tokens.labels("model.gguf").inc(record.prompt_tokens)
        meters.generated_tokens.labels("model.gguf").inc(record.completion_tokens)
        meters.first_token_seconds.observe(0.05)
        meters.queue_seconds.observe(0.0)
        return record

    text, as_json = logging.Formatter("%(levelname)s %(name)s: %(message)s"), JsonFormatter("worker 1", os.getpid())

    def log_record(record: RequestRecord) -> logging.LogRecord:
        line = logging.LogRecord("api.access", logging.INFO, "", 0, "%s %s %d %.1f ms id=%s",
                                 (record.method, record.route, record.status, 1.0, record.id), None)
        line.fields = record.fields()
        return line

    base, metered = best_of(bare, calls), best_of(instrumented, calls)
    text_us = best_of(lambda: text.format(log_record(bare())), calls)
    json_us = best_of(lambda: as_json.format(log_record(bare())), calls)

    compactor = metrics.Compactor(folder, every=dead + 1)
    for pid in range(1_000_000, 1_000_000 + dead):
        fake_pid[0] = pid
        instrumented()
        compactor.dead.append(pid)
    scrape_before = best_of(metrics.exposition, 1, rounds=3) / 1000
    files_before = len(list(folder.glob("*.db")))
    started = time.perf_counter()
    compactor.compact()
    compact_ms = (time.perf_counter() - started) * 1000
    scrape_after = best_of(metrics.exposition, 1, rounds=3) / 1000
    return {
        "instrumentation per request": {"baseline_us": round(base, 2), "with_metrics_us": round(metered, 2),
                                        "delta_us": round(metered - base, 2), "ratio": round(metered / base, 2)},
        "access log line": {"text_us": round(text_us, 2), "json_us": round(json_us, 2),
                            "delta_us": round(json_us - text_us, 2), "ratio": round(json_us / text_us, 2)},
        f"scrape after {dead} dead workers": {"files_before": files_before, "before_ms": round(scrape_before, 2),
                                              "compaction_ms": round(compact_ms, 2),
                                              "files_after": len(list(folder.glob("**/*.db"))),
                                              "after_ms": round(scrape_after, 2),
                                              "ratio": round(scrape_before / scrape_after, 1)},
    }


def run(calls: int, dead: int = DEAD) -> dict[str, dict[str, float]]:
    """In a child process: the multiprocess mode and its value class are process-wide."""
    done = subprocess.run([sys.executable, "-m", "bench.metrics", str(calls), str(dead)], capture_output=True,
                          text=True, check=True, timeout=600)
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
