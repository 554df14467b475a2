"""The target a fork-server child runs: the worker side's entry point when the supervisor forks.

Kept tiny and free of imports, because the supervisor names this function (it imports this module
to pass it as the target) and must not import the worker, which loads Flask and waitress. The fork
server has api.worker.cli preloaded, so the import below is free in the child."""

from __future__ import annotations

import socket


def start_worker(argv: list[str], public: socket.socket, output: socket.socket, commands: socket.socket) -> None:
    from api.worker.cli import run_forked

    run_forked(argv, public, output, commands)
