"""Workers that load in the same second must not sample identically (gpt4all seeds from the clock)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.sampler_seed import SLOT_FOLDER, claim_slot
from install.bundled_models import prepare_default_models
from testing.servers import REPO, base_env

pytestmark = pytest.mark.bundled


def test_slots_count_loads_within_a_second(tmp_path: Path) -> None:
    second = int(time.time())
    assert [claim_slot(tmp_path, second + 0.2, second + 0.9) for _ in range(3)] == [0, 1, 2]
    assert claim_slot(tmp_path, second + 1.1, second + 1.5) == 0
    assert claim_slot(tmp_path, second + 0.9, second + 1.2) == 3  # spans two seconds: the larger claim counts


def test_old_slots_are_forgotten(tmp_path: Path) -> None:
    claim_slot(tmp_path, 1000.1, 1000.2)  # long ago
    claim_slot(tmp_path, time.time(), time.time())
    assert not any(entry.name.startswith("1000-") for entry in (tmp_path / SLOT_FOLDER).iterdir())


def sample_together(run_dirs: list[Path]) -> list[dict]:
    """Start one probe per run folder so that they all load the real model in the same second."""
    prepare_default_models(REPO / "models")
    start = int(time.time()) + 2 + 0.05
    probes = [subprocess.Popen([sys.executable, "-m", "tests.seed_probe", str(start)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=base_env(WATCHDOG_TEMPFILE=run_dir, N_THREADS=1))
              for run_dir in run_dirs]
    results = [json.loads(probe.communicate(timeout=60)[0]) for probe in probes]
    if len({tuple(result["seconds"]) for result in results}) != 1:
        pytest.skip("the probes did not load within the same second on this busy machine")
    return results


def test_same_second_loads_sample_differently(tmp_path: Path) -> None:
    control = sample_together([tmp_path / "a", tmp_path / "b"])  # separate run folders: nothing to coordinate
    assert control[0]["text"] == control[1]["text"], "gpt4all no longer seeds from the clock: revisit sampler_seed"
    shared = sample_together([tmp_path / "shared"] * 3)
    assert len({result["text"] for result in shared}) == 3
