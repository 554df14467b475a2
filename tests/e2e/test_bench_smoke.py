"""The benchmark runs in CI only as a smoke test: it completes and writes valid JSON. Its figures
are never asserted (these machines are shared and noisy)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.__main__ import SCENARIOS
from testing.servers import REPO, base_env, cmdline_text, processes_naming
from testing.tiny_models import build_tiny_chat_model


def run_bench(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """The benchmark, with its folders (and so its daemons' command lines) under tmp_path."""
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=REPO, env=base_env(TMPDIR=tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(bench: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for the benchmark; past the timeout stop it the way a CI runner would (SIGTERM)."""
    try:
        return bench.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        bench.terminate()
        stdout, stderr = bench.communicate(timeout=30)
        raise AssertionError(f"the benchmark ran past {timeout} s\n{stdout[-2000:]}{stderr[-3000:]}") from None


def test_quick_bench_completes_and_writes_json(tmp_path: Path) -> None:
    model = build_tiny_chat_model(tmp_path / "bench-tiny.gguf", context_length=2048)  # room for 1024-token prompts
    out = tmp_path / "bench.json"
    bench = run_bench(tmp_path, "--quick", "--threads", "1", "--model", str(model), "--json", str(out))
    stdout, stderr = finish(bench, timeout=300)
    assert bench.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert processes_naming(tmp_path) == [], "the benchmark left processes behind"
    report = json.loads(out.read_text())
    scenarios = report["scenarios"]
    assert list(scenarios) == list(SCENARIOS)
    assert all(row["failures"] == 0 and row["requests_per_second"] > 0 for row in scenarios["concurrency"].values())
    for scenario in ("overhead", "growth"):
        assert all(row["ratio"] > 0 for row in scenarios[scenario].values())
    restarting = scenarios["restart"]["restart every request, 1 thread(s)"]
    assert restarting["worker_processes"] == restarting["requests"], "each request met a fresh worker"
    assert all(row["next_request_ms"] > 0 for name, row in scenarios["recovery"].items() if name.startswith("SIGKILL"))
    assert all(row["replaced_after_s"] >= row["hung_after_s"] > 0 for name, row in scenarios["recovery"].items()
               if name.startswith("SIGSTOP"))
    assert scenarios["memory"]["2 worker(s), 1 spare(s)"]["processes"] > scenarios["memory"]["1 worker(s), 0 spare(s)"]["processes"]
    queue = scenarios["queue"]
    assert queue["refused by the supervisor (workers all taken)"]["answered_by_supervisor"] == \
        queue["refused by the supervisor (workers all taken)"]["requests"]
    assert queue["refused by a worker (line full)"]["answered_by_supervisor"] == 0
    assert queue["queue bookkeeping in process"]["per_request_us"] > 0
    assert "one_token_request, restart every request" in stdout
    costs = scenarios["metrics"]
    assert costs["instrumentation per request"]["with_metrics_us"] > 0
    scrape = costs["scrape after 100 dead workers"]
    assert scrape["files_before"] > 100 > scrape["files_after"], "compaction took in the dead workers' files"


def test_a_benchmark_stopped_with_sigterm_stops_the_daemons_it_started(tmp_path: Path) -> None:
    model = build_tiny_chat_model(tmp_path / "bench-tiny.gguf")
    bench = run_bench(tmp_path, "--quick", "--threads", "1", "--model", str(model), "--only", "recovery",
                      "--json", str(tmp_path / "bench.json"))
    try:
        deadline = time.monotonic() + 60
        while not any("watchdog_main.py" in cmdline_text(process) for process in processes_naming(tmp_path)):
            assert time.monotonic() < deadline and bench.poll() is None, "no daemon came up"
            time.sleep(0.05)
        bench.send_signal(signal.SIGTERM)
        bench.communicate(timeout=30)
        assert bench.returncode == 143
        assert processes_naming(tmp_path) == [], "a daemon outlived the benchmark"
    finally:
        bench.kill()
        for process in processes_naming(tmp_path):
            process.kill()
