"""Fixtures shared by the whole suite: tiny models built once per session, and worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess, start_worker
from tests.tiny_models import build_tiny_chat_model, build_tiny_embedding_model

TINY_CHAT = "tiny-chat.gguf"
TINY_EMBED = "tiny-embed.gguf"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with the tiny chat and embedding models (see tests/tiny_models.py)."""
    folder = tmp_path_factory.mktemp("tiny-models")
    build_tiny_chat_model(folder / TINY_CHAT)
    build_tiny_embedding_model(folder / TINY_EMBED)
    return folder


def tiny_settings(**overrides: object) -> dict[str, object]:
    settings: dict[str, object] = {"MODEL_NAME": TINY_CHAT, "EMBEDDING_MODEL_NAME": TINY_EMBED, "N_THREADS": 1}
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def tiny_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One standalone worker on the tiny models, shared by a test module (its tests do not change it)."""
    worker = start_worker(tiny_model_dir, tmp_path_factory.mktemp("worker"), **tiny_settings())
    try:
        yield worker.wait_ready()
    finally:
        assert worker.stop() == [], "the worker left processes behind"


FAULT_LOAD_COUNTS = pytest.StashKey[list[str]]()
"""Lines of the fault and load suite's table (tests/test_fault_load.py), shown at the end of the run."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Show the fault and load counts in every run, not only with -s (where the test prints them too)."""
    lines = config.stash.get(FAULT_LOAD_COUNTS, [])
    if lines:
        terminalreporter.section("fault and load: requests per outcome")
        for line in lines:
            terminalreporter.write_line(line)
