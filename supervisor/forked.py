"""The target a fork-server child runs. Kept tiny and free of imports: the child imports this
module to find it, and the supervisor must be able to name it without importing the worker
(which imports gpt4all). The fork server has api.worker preloaded, so the import below is free."""

from __future__ import annotations

import socket


def start_worker(argv: list[str], public: socket.socket, output: socket.socket, commands: socket.socket) -> None:
    from api.worker import run_forked

    run_forked(argv, public, output, commands)
