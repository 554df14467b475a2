"""What the watchdog supervisor costs and how fast it reacts. Figures printed, never asserted.

    python bench/supervisor_bench.py [--model PATH] [--requests 50] [--repeats 3] [--quick]

1. Restart per request: N sequential chat requests with RESTART_AFTER_REQUESTS=1 against the same
   with 0 (one worker for all), as a throughput ratio; for both ways of starting workers.
2. SIGKILL of a worker in the middle of a generation: time until the next request is answered.
3. SIGSTOP of a worker in the middle of a generation: time until the supervisor says it hung, and
   until it is gone; the same for an idle worker, found by the health probe.
4. Proportional memory (PSS) of the whole service (supervisor, fork server, workers) with
   1 worker + 1 warm spare against 1 worker alone.

Each scenario starts the real daemon (`watchdog_main.py`) on a free loopback port. The machines
here are shared: compare figures of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from api.protocol import is_sentinel_name, read_sentinel  # noqa: E402
from tests.servers import PYTHON, ServerProcess, base_env, free_port  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24, "temperature": 0}
# A long generation for the fault scenarios: counting goes on until max_tokens.
LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 4000, "temperature": 0, "stream": True}


@contextlib.contextmanager
def service(model: Path, threads: int, **settings: object) -> Iterator[ServerProcess]:
    with tempfile.TemporaryDirectory(prefix="supervisor-bench-") as folder:
        tmp = Path(folder)
        port = free_port()
        env = base_env(MODEL_PATH=model.parent, MODEL_NAME=model.name, EMBEDDING_MODEL_NAME="none.gguf",
                       N_THREADS=threads, LISTEN_PORT=port, WATCHDOG_TEMPFILE=tmp / "run", LOG_FOLDER_NAME=tmp / "logs",
                       **settings)
        daemon = ServerProcess([PYTHON, str(REPO / "watchdog_main.py")], env, port, tmp / "console.log").start()
        daemon.run_dir = tmp / "run"  # type: ignore[attr-defined]
        daemon.log_file = tmp / "logs" / "gpt4all-api.log"  # type: ignore[attr-defined]
        try:
            daemon.wait_ready(timeout=120)
            wait_until(lambda: ready_workers(daemon) >= int(str(settings.get("WARM_SPARES", 1))) + 1, 60)
            yield daemon
        finally:
            daemon.stop()


def wait_until(predicate, timeout: float, step: float = 0.005) -> float:  # type: ignore[no-untyped-def]
    """Seconds until predicate() was true (raises TimeoutError)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    raise TimeoutError("condition not met")


def sentinels(daemon: ServerProcess) -> list:  # type: ignore[type-arg]
    run_dir: Path = daemon.run_dir  # type: ignore[attr-defined]
    return [s for p in run_dir.glob("*") if is_sentinel_name(p.name) and (s := read_sentinel(p)) is not None]


def ready_workers(daemon: ServerProcess) -> int:
    return sum(1 for s in sentinels(daemon) if s.state.value == "READY")


def generating_worker(daemon: ServerProcess) -> int:
    return next((s.pid for s in sentinels(daemon) if s.generating), 0)


def start_long_generation(daemon: ServerProcess) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(requests.RequestException), requests.post(
                daemon.url + "/v1/completions", json=LONG, stream=True, timeout=120) as response:
            for _ in response.iter_lines():
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def log_text(daemon: ServerProcess) -> str:
    path: Path = daemon.log_file  # type: ignore[attr-defined]
    return path.read_text(errors="replace") if path.exists() else ""


# -- 1. restart per request


def sequential(daemon: ServerProcess, count: int) -> tuple[float, int]:
    session = requests.Session()
    pids = set()
    started = time.perf_counter()
    for _ in range(count):
        response = session.post(daemon.url + "/v1/chat/completions", json=CHAT, timeout=120)
        response.raise_for_status()
        pids.add(response.headers["X-Worker-Pid"])
    return time.perf_counter() - started, len(pids)


def auto_threads(**settings: object) -> int:
    """The threads per worker the daemon picks with N_THREADS=0 (api.config)."""
    from api.config import load_settings

    environ = {key: str(value) for key, value in settings.items()}
    return load_settings(environ, env_file=Path(os.devnull)).threads_per_worker


def restart_cost(args: argparse.Namespace) -> None:
    print(f"\n1. {args.requests} sequential chat requests (max_tokens {CHAT['max_tokens']}), best of {args.repeats}")
    print(f"{'':<44}{'threads':>8}{'seconds':>9}{'req/s':>8}{'workers':>9}{'ratio':>8}")
    restart_threads = args.threads or auto_threads(RESTART_AFTER_REQUESTS=1)
    plain_threads = args.threads or auto_threads(RESTART_AFTER_REQUESTS=0)
    rows = [("never restart (RESTART_AFTER_REQUESTS=0)", 0, plain_threads, "forkserver")]
    if restart_threads != plain_threads:
        rows.append(("never restart, same threads as below", 0, restart_threads, "forkserver"))
    rows += [("restart per request, fork server", 1, restart_threads, "forkserver"),
             ("restart per request, spawn", 1, restart_threads, "spawn")]
    baseline = None
    for label, restart_after, threads, method in rows:
        with service(args.model, threads, RESTART_AFTER_REQUESTS=restart_after, WORKER_START_METHOD=method) as daemon:
            sequential(daemon, 3)  # warm-up
            seconds, workers = min(sequential(daemon, args.requests) for _ in range(args.repeats))
        baseline = baseline or seconds
        print(f"{label:<44}{threads:>8}{seconds:>9.2f}{args.requests / seconds:>8.1f}{workers:>9}{seconds / baseline:>7.2f}x")
    print("   (ratio: time against the first row; the second row is the same thread count without restarts)")


# -- 2. SIGKILL of a busy worker


def kill_recovery(args: argparse.Namespace) -> None:
    quick = {**CHAT, "max_tokens": 1}
    samples, plain = [], []
    with service(args.model, args.threads, RESTART_AFTER_REQUESTS=0) as daemon:
        for _ in range(args.repeats + 2):
            started = time.perf_counter()
            requests.post(daemon.url + "/v1/chat/completions", json=quick, timeout=60).raise_for_status()
            plain.append(time.perf_counter() - started)
            start_long_generation(daemon)
            pid = int(wait_until_value(lambda: generating_worker(daemon), 30))
            psutil.Process(pid).send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            requests.post(daemon.url + "/v1/chat/completions", json=quick, timeout=60).raise_for_status()
            samples.append(time.perf_counter() - killed)
            wait_until(lambda: ready_workers(daemon) >= 2, 60)
    print(f"\n2. SIGKILL of a generating worker -> next 1-token request answered: median {statistics.median(samples) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{s * 1000:.0f}' for s in samples)} ms); the same request with no kill: "
          f"{statistics.median(plain) * 1000:.0f} ms")


def wait_until_value(getter, timeout: float) -> object:  # type: ignore[no-untyped-def]
    box: list[object] = []
    wait_until(lambda: box.append(getter()) or box[-1], timeout)
    return box[-1]


# -- 3. SIGSTOP


def stop_detection(args: argparse.Namespace) -> None:
    settings = {"RESTART_AFTER_REQUESTS": 0, "STALL_TIMEOUT": 2, "HEALTH_INTERVAL": 1, "KILL_TIMEOUT": 1}
    print("\n3. SIGSTOP detection with STALL_TIMEOUT=2 s, HEALTH_INTERVAL=1 s, KILL_TIMEOUT=1 s (+1 s margin for the "
          "worker's own limit)")
    for busy in (True, False):
        detected, gone = [], []
        with service(args.model, args.threads, **settings) as daemon:
            for _ in range(args.repeats):
                if busy:
                    start_long_generation(daemon)
                    pid = int(wait_until_value(lambda: generating_worker(daemon), 30))
                else:
                    pid = next(s.pid for s in sentinels(daemon) if s.state.value == "READY")
                hung_after, gone_after = freeze(daemon, pid)
                detected.append(hung_after)
                gone.append(gone_after)
        what = "a generating worker (no progress)" if busy else "an idle worker (health probes)"
        print(f"   {what:<36} hung after {statistics.median(detected):.2f} s, gone after {statistics.median(gone):.2f} s")


def freeze(daemon: ServerProcess, pid: int) -> tuple[float, float]:
    """SIGSTOP `pid`; seconds until the supervisor logs it as hung, and until it is gone.
    Returns once its replacement is ready."""
    process = psutil.Process(pid)
    pattern = re.compile(rf"\(pid {pid}\) seems hung")
    process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: bool(pattern.search(log_text(daemon))), 60, step=0.01)
    hung_after = time.monotonic() - stopped
    wait_until(lambda: not process.is_running() or process.status() == psutil.STATUS_ZOMBIE, 60, step=0.01)
    gone_after = time.monotonic() - stopped
    # replaced, and its sentinel removed (reaped), before the next round picks a worker
    wait_until(lambda: ready_workers(daemon) >= 2 and pid not in {s.pid for s in sentinels(daemon)}, 60)
    return hung_after, gone_after


# -- 4. memory


def service_pss(daemon: ServerProcess) -> tuple[float, int]:
    processes = [psutil.Process(daemon.pid), *daemon.descendants()]
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total / 2**20, len(processes)


def memory(args: argparse.Namespace) -> None:
    print("\n4. Proportional memory (PSS) of the whole service, idle after one request")
    rows = {}
    for method in ("forkserver", "spawn"):
        for spares in (0, 1):
            with service(args.model, args.threads, WARM_SPARES=spares, RESTART_AFTER_REQUESTS=0,
                         WORKER_START_METHOD=method) as daemon:
                sequential(daemon, 1)
                time.sleep(0.5)
                rows[(method, spares)] = service_pss(daemon)
    for method in ("forkserver", "spawn"):
        alone, _ = rows[(method, 0)]
        with_spare, count = rows[(method, 1)]
        print(f"   {method:<11} 1 worker: {alone:6.1f} MiB   1 worker + 1 spare: {with_spare:6.1f} MiB "
              f"({count} processes)   the spare costs {with_spare - alone:5.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=0, help="N_THREADS for the daemon (0: its automatic choice)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10 requests, one repeat: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = 10, 1
    if not args.model.is_file():
        print(f"supervisor_bench: model not found: {args.model} (run ./start.sh once, or pass --model)", file=sys.stderr)
        return 2
    print(f"model {args.model.name}, N_THREADS={args.threads}, {psutil.cpu_count()} CPUs")
    restart_cost(args)
    kill_recovery(args)
    stop_detection(args)
    memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
