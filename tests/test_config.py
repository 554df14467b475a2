"""Configuration: .env then environment, typed values, one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from api.config import FIELDS, PROJECT_ROOT, ConfigError, load_settings, render_env_example
from testing.servers import REPO, base_env


def test_defaults_are_safe_and_documented(tmp_path: Path) -> None:
    settings = load_settings({}, env_file=tmp_path / "missing.env")
    assert settings.listen_ip == "127.0.0.1"
    assert settings.listen_port == 5000
    assert settings.route == "/gpt4all_api"
    assert settings.model_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert settings.model_path == PROJECT_ROOT / "models"
    assert settings.log_dir == PROJECT_ROOT / "logs"
    assert settings.api_key == "" and settings.authorized_urls == ()
    assert settings.restart_after_requests == 1 and settings.workers == 1 and settings.warm_spares == 1
    assert settings.allow_download is False


def test_environment_overrides_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LISTEN_PORT=6001\nROUTE=/from_file\nDEBUG=true\n")
    settings = load_settings({"LISTEN_PORT": "6002"}, env_file=env_file)
    assert settings.listen_port == 6002
    assert settings.route == "/from_file"
    assert settings.debug is True


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("LISTEN_PORT", "abc", "a whole number"),
    ("LISTEN_PORT", "70000", "<= 65535"),
    ("LISTEN_IP", "localhost:80", "an IP address"),
    ("DEVICE", "tpu", "one of cpu"),
    ("MODEL_NAME", "../etc/passwd.gguf", "a bare .gguf file name"),
    ("MODEL_NAME", "/abs/model.gguf", "a bare .gguf file name"),
    ("MODEL_NAME", "model.bin", "a bare .gguf file name"),
    ("DEBUG", "maybe", "true or false"),
    ("REQUEST_TIMEOUT", "-1", "seconds > 0"),
    ("ROUTE", "no-slash", "a URL path"),
    ("WORKERS", "0", ">= 1"),
])
def test_bad_values_name_key_value_and_expectation(tmp_path: Path, key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({key: value}, env_file=tmp_path / "none")
    message = str(caught.value)
    assert key in message and repr(value) in message and expected in message
    assert "\n" not in message


def test_env_example_documents_every_key_with_its_default() -> None:
    assert (REPO / ".env.example").read_text() == render_env_example(), "regenerate: python -m api.config > .env.example"
    text = render_env_example()
    for field in FIELDS:
        assert f"\n{field.key}={field.default}\n" in text


@pytest.mark.parametrize(("settings", "key"), [
    ({"LISTEN_PORT": "abc"}, "LISTEN_PORT"),
    ({"MODEL_NAME": "missing-model.gguf"}, "MODEL_NAME"),
    ({"DEVICE": "quantum"}, "DEVICE"),
])
def test_worker_refuses_bad_config_with_one_line(tmp_path: Path, settings: dict[str, str], key: str) -> None:
    env = base_env(MODEL_PATH=tmp_path, **settings)
    result = subprocess.run([sys.executable, "-m", "api"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and "Traceback" not in result.stderr
