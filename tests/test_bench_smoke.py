"""The benchmark runs in CI only as a smoke test: it completes and writes valid JSON. Its figures
are never asserted (these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.__main__ import SCENARIOS
from tests.servers import REPO, base_env
from tests.tiny_models import build_tiny_chat_model


def test_quick_bench_completes_and_writes_json(tmp_path: Path) -> None:
    model = build_tiny_chat_model(tmp_path / "bench-tiny.gguf", context_length=2048)  # room for 1024-token prompts
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--model", str(model),
         "--json", str(out)],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
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
    assert "one_token_request, restart every request" in result.stdout
