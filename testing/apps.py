"""The Flask app in-process, with no model loaded: validation, routing and the document run before any model is needed."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from api.app import create_app
from api.config import load_settings
from api.runtime import Runtime


def make_app(tmp_path: Path, **settings: object) -> Flask:
    values = {"MODEL_PATH": str(tmp_path)}
    values.update({key: str(value) for key, value in settings.items()})
    loaded = load_settings(values, env_file=tmp_path / "no.env")
    return create_app(loaded, Runtime(loaded))  # models never loaded: validation runs before they are needed
