"""Start the real daemon for a scenario: on a free loopback port, in a folder of its own, with the
settings the scenario asks for, and stopped (with everything it started) when the scenario is done."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from api.config import Settings, load_settings
from testing.servers import PYTHON, ServerProcess, Service, base_env, free_port

StartDaemon = Callable[..., AbstractContextManager[Service]]  # Launcher.start: settings in, a ready daemon out


def daemon_settings(env: dict[str, str]) -> Settings:
    """The settings a daemon started with this environment (and no .env) will run with."""
    return load_settings(env, env_file=Path(os.devnull))


def threads_chosen_by_daemon(**settings: object) -> int:
    """The threads per worker the daemon picks by itself (N_THREADS=0) with these settings."""
    return daemon_settings(base_env(**settings)).threads_per_worker


class Launcher:
    """Starts daemons on one model, each with the settings a scenario gives it."""

    def __init__(self, model: Path, folder: Path, threads: int | None = None) -> None:
        self.model = model
        self.folder = folder
        self.threads = threads  # None: let each daemon choose (N_THREADS=0)

    @contextlib.contextmanager
    def start(self, **settings: object) -> Iterator[Service]:
        """The daemon (`watchdog_main.py`), once every worker and spare it keeps is READY."""
        home = Path(tempfile.mkdtemp(dir=self.folder))
        port = free_port()
        settings.setdefault("N_THREADS", self.threads or 0)
        env = base_env(MODEL_PATH=self.model.parent, MODEL_NAME=self.model.name, EMBEDDING_MODEL_NAME="none.gguf",
                       LISTEN_PORT=port, LOG_FOLDER_NAME=home / "logs", WATCHDOG_TEMPFILE=home / "run", **settings)
        service = Service(ServerProcess([PYTHON, "watchdog_main.py"], env, port, home / "console.log").start(), home)
        try:
            service.process.wait_ready(timeout=120)
            chosen = daemon_settings(env)
            expected = chosen.workers + chosen.warm_spares
            service.wait_for(lambda: service.ready_count() >= expected, 120, f"{expected} ready workers")
            yield service
        finally:
            service.process.stop()
