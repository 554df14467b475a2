"""The Flask app in-process: with no model loaded (validation, routing and the document run before
any model is needed), or on the fake engine (testing/fake_engine.py) for wire shapes."""

from __future__ import annotations

import contextlib
from pathlib import Path

from flask import Flask

from api.app import create_app
from api.config import load_settings
from api.inference import ModelLoadError
from api.runtime import Runtime
from testing.fake_engine import FakeLoader
from testing.tiny_models import tiny_settings


def make_app(tmp_path: Path, **settings: object) -> Flask:
    values = {"MODEL_PATH": str(tmp_path)}
    values.update({key: str(value) for key, value in settings.items()})
    loaded = load_settings(values, env_file=tmp_path / "no.env")
    return create_app(loaded, Runtime(loaded))  # models never loaded: validation runs before they are needed


def make_fake_app(model_dir: Path, tmp_path: Path, **settings: object) -> Flask:
    """The whole app with its models loaded on the fake engine: the files in `model_dir` (the tiny
    models) are listed and described as usual, but nothing is read by gpt4all."""
    values = {"MODEL_PATH": str(model_dir), "WATCHDOG_TEMPFILE": str(tmp_path / "run"),
              "LOG_FOLDER_NAME": str(tmp_path / "logs")}
    values.update({key: str(value) for key, value in tiny_settings(**settings).items()})
    loaded = load_settings(values, env_file=tmp_path / "no.env")
    runtime = Runtime(loaded, loader=FakeLoader())
    with contextlib.suppress(ModelLoadError):  # as a worker does: health and every model route say why
        runtime.load()
    return create_app(loaded, runtime)
