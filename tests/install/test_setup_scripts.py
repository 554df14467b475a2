"""The set-up shared by start.sh and test.sh (scripts/_common.sh), run for real with bash."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_setup_venv(venv_dir: Path) -> subprocess.CompletedProcess[str]:
    script = 'set -euo pipefail; . scripts/_common.sh; setup_venv; "$PY" -c "import pip; print(pip.__name__)"'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "VENV_NAME": str(venv_dir), "PYTHON": sys.executable})


def test_a_virtualenv_left_without_pip_by_an_interrupted_start_is_made_again(tmp_path: Path) -> None:
    broken = tmp_path / "venv"
    venv.create(broken, with_pip=False)  # what `python -m venv` leaves when stopped before ensurepip
    result = run_setup_venv(broken)
    assert result.returncode == 0, result.stderr
    assert "left incomplete" in result.stderr
    assert result.stdout.strip() == "pip"
    assert (broken / ".venv-complete").is_file()
    again = run_setup_venv(broken)  # complete now: used as it is
    assert again.returncode == 0 and "creating" not in again.stderr, again.stderr
