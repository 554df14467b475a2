"""The benchmark runs in CI only as a smoke test: it completes and writes valid JSON. Its figures
are never asserted (these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.servers import REPO, base_env
from tests.tiny_models import build_tiny_chat_model


def test_quick_bench_completes_and_writes_json(tmp_path: Path) -> None:
    model = build_tiny_chat_model(tmp_path / "bench-tiny.gguf", context_length=2048)  # room for 1024-token prompts
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--server", "worker", "--threads", "1", "--model", str(model),
         "--json", str(out)],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["scenarios"]) == {"overhead", "growth", "concurrency"}
    assert all(row["failures"] == 0 and row["requests_per_second"] > 0
               for row in report["scenarios"]["concurrency"].values())
    for scenario in ("overhead", "growth"):
        assert all(row["ratio"] > 0 for row in report["scenarios"][scenario].values())
    assert "one_token_request" in result.stdout
