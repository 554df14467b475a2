"""Fixtures shared by the whole suite: the tiny models built once per session, a standalone worker on
them (tiny_worker), supervisors (start_service), workers run the way the supervisor runs them
(supervised_worker) and a worker on the bundled models (bundled_worker). The helpers behind them
live in testing/, which bench/ uses too."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from install.bundled_models import prepare_default_models
from testing.servers import (
    PYTHON,
    REPO,
    ServerProcess,
    Service,
    Worker,
    free_port,
    processes_naming,
    running_worker,
    supervisor_env,
)
from testing.summary import FAULT_LOAD_COUNTS
from testing.tiny_models import TINY_CHAT, TINY_EMBED, build_tiny_chat_model, build_tiny_embedding_model, tiny_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with the tiny chat and embedding models (see testing/tiny_models.py)."""
    folder = tmp_path_factory.mktemp("tiny-models")
    build_tiny_chat_model(folder / TINY_CHAT)
    build_tiny_embedding_model(folder / TINY_EMBED)
    return folder


@pytest.fixture(scope="module")
def tiny_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One standalone worker on the tiny models, shared by a test module (its tests do not change it)."""
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("worker"), **tiny_settings()) as worker:
        yield worker




def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Show the fault and load counts in every run, not only with -s (where the test prints them too)."""
    lines = config.stash.get(FAULT_LOAD_COUNTS, [])
    if lines:
        terminalreporter.section("fault and load: requests per outcome")
        for line in lines:
            terminalreporter.write_line(line)






@pytest.fixture
def start_service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """start_service(**settings) runs a supervisor; all are stopped, and checked for leftovers, after the test."""
    services: list[Service] = []

    def start(*, wait: bool = True, model_dir: Path = tiny_model_dir, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, **settings: object) -> Service:
        folder = tmp_path / f"service-{len(services)}"
        port = int(settings.pop("LISTEN_PORT", 0)) or free_port()  # type: ignore[call-overload]
        environment = supervisor_env(model_dir, folder, port, **settings)
        environment.update(env or {})
        folder.mkdir()
        process = ServerProcess([PYTHON, "watchdog_main.py", *args], environment, port, folder / "console.log").start()
        service = Service(process, folder)
        services.append(service)
        if wait:
            process.wait_ready(timeout=30)
        return service

    yield start
    for service in services:
        survivors = service.process.stop(timeout=15)
        assert survivors == [], f"processes left behind: {survivors}"
    leftovers = processes_naming(tmp_path)
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert leftovers == [], f"processes left behind: {leftovers}"




@pytest.fixture
def supervised_worker(tiny_model_dir: Path, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    workers: list[Worker] = []

    def start(restart_after: int = 1, model_dir: Path = tiny_model_dir) -> Worker:
        worker = Worker(model_dir, tmp_path, restart_after)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()
        assert not psutil.pid_exists(worker.process.pid)





@pytest.fixture(scope="module")
def bundled_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = REPO / "models"
    prepare_default_models(model_dir)  # what ./start.sh does; a no-op when already prepared
    # One thread: with as many threads as cores, llama.cpp spin-waits and slows 20x whenever the machine is busy
    with running_worker(model_dir, tmp_path_factory.mktemp("bundled"), N_THREADS=1, ready_timeout=60) as worker:
        yield worker
