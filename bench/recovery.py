"""How fast the supervisor gets over a dead or frozen worker, with real faults.

- SIGKILL of a worker in the middle of a generation: time from the kill until the next 1-token
  request is answered, with a warm spare ready (the default) and without one (a replacement must
  load first). Baseline: the same request with no kill, in the same run.
- SIGSTOP of a worker: time until the supervisor says it is hung, until it is gone, and until its
  replacement is READY; for a generating worker (found by its lack of progress) and an idle one
  (found by failed health probes). Baseline: the limit the settings allow.
"""

from __future__ import annotations

import re
import signal
import statistics
import time

import psutil

from bench.daemon import StartDaemon
from bench.measure import post_json
from supervisor.arbiter import Timing
from testing.servers import Service

ONE_TOKEN = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 1}
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10", "max_tokens": 1500, "temperature": 0}  # runs until killed
MAX_REFUSALS, RETRY_PAUSE = 100, 0.1  # after a kill: retry a 503 ten times a second, for up to 10 s
# Short limits so a freeze is found in seconds (the defaults suit long generations on big models).
FAST_LIMITS = {"STALL_TIMEOUT": 2, "HEALTH_INTERVAL": 1, "KILL_TIMEOUT": 1}


def run(start: StartDaemon, samples: int) -> dict[str, dict[str, float]]:
    results = {}
    for spares in (1, 0):
        with start(RESTART_AFTER_REQUESTS=0, WARM_SPARES=spares) as service:
            results[f"SIGKILL busy worker, {spares} warm spare(s)"] = kill_recovery(service, samples)
    with start(RESTART_AFTER_REQUESTS=0, **FAST_LIMITS) as service:
        results["SIGSTOP busy worker"] = freeze_recovery(service, samples, busy=True)
        results["SIGSTOP idle worker"] = freeze_recovery(service, samples, busy=False)
    return results


def one_token_request(service: Service) -> float:
    reply = post_json(service.port, "/v1/chat/completions", ONE_TOKEN)
    assert reply.status == 200, reply.body
    return reply.seconds


def kill_recovery(service: Service, samples: int) -> dict[str, float]:
    expected_ready = service.ready_count()
    plain, after_kill = [], []
    refused = 0
    for _ in range(samples):
        plain.append(one_token_request(service))
        thread, stream = service.stream_in_background(COUNTING, timeout=120)
        victim = psutil.Process(service.streaming_worker(stream, timeout=30))
        victim.send_signal(signal.SIGKILL)
        killed_at = time.perf_counter()
        refused += served_after_refusals(service)
        after_kill.append(time.perf_counter() - killed_at)
        thread.join(30)
        service.wait_for(lambda: service.ready_count() >= expected_ready, 60, "the pool to be whole again")
    return {"next_request_ms": round(statistics.median(after_kill) * 1000, 1),
            "without_kill_ms": round(statistics.median(plain) * 1000, 1),
            "added_ms": round((statistics.median(after_kill) - statistics.median(plain)) * 1000, 1),
            "refused_503": refused, "samples": samples}


def served_after_refusals(service: Service) -> int:
    """Send the one-token request until it is answered; how many 503s came first. Without a
    spare, a replacement that loads for longer than the supervisor's short wait (a busy machine)
    has clients told to retry (503 with Retry-After) rather than kept waiting: that is by design."""
    refused = 0
    while True:
        reply = post_json(service.port, "/v1/chat/completions", ONE_TOKEN)
        if reply.status != 503 or refused >= MAX_REFUSALS:
            assert reply.status == 200, reply.body
            return refused
        refused += 1
        time.sleep(RETRY_PAUSE)


def freeze_recovery(service: Service, samples: int, *, busy: bool) -> dict[str, float]:
    expected_ready = service.ready_count()
    hung, gone, replaced = [], [], []
    for _ in range(samples):
        thread = None
        if busy:
            thread, stream = service.stream_in_background(COUNTING, timeout=120)
            pid = service.streaming_worker(stream, timeout=30)
        else:
            pid = next(pid for pid, sentinel in service.sentinels().items() if sentinel.state.value == "READY")
        times = freeze(service, pid, expected_ready)
        for values, value in zip((hung, gone, replaced), times, strict=True):
            values.append(value)
        if thread:
            thread.join(30)
    return {"hung_after_s": round(statistics.median(hung), 2), "gone_after_s": round(statistics.median(gone), 2),
            "replaced_after_s": round(statistics.median(replaced), 2), "limit_s": freeze_limit(busy=busy),
            "samples": samples}


def freeze(service: Service, pid: int, expected_ready: int) -> tuple[float, float, float]:
    """SIGSTOP `pid`; seconds until the supervisor logs it as hung, until it is gone, and until the
    pool has its READY workers again without it."""
    process = psutil.Process(pid)
    says_hung = re.compile(rf"\(pid {pid}\) seems hung")
    process.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    service.wait_for(lambda: says_hung.search(service.log()), 60, f"pid {pid} to be called hung")
    hung_after = time.monotonic() - stopped_at
    service.wait_for(lambda: not process.is_running() or process.status() == psutil.STATUS_ZOMBIE, 60, f"pid {pid} gone")
    gone_after = time.monotonic() - stopped_at
    service.wait_for(lambda: service.ready_count() >= expected_ready and pid not in service.sentinels(), 60,
                     "a replacement")
    return hung_after, gone_after, time.monotonic() - stopped_at


def freeze_limit(*, busy: bool) -> float:
    """The longest the settings let a frozen worker go unnoticed: a generation's stall limit plus
    the supervisor's margin, or a run of failed health probes."""
    timing = Timing()
    if busy:
        return FAST_LIMITS["STALL_TIMEOUT"] + timing.hang_margin
    probe_timeout = min(timing.probe_timeout_max, max(timing.probe_timeout_min, FAST_LIMITS["HEALTH_INTERVAL"]))
    return timing.probe_failures_for_hang * FAST_LIMITS["HEALTH_INTERVAL"] + probe_timeout
