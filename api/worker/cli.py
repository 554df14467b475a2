"""The worker's command line (`python -m api`): standalone, supervised (spawned), or forked by the
supervisor's fork server.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import waitress

from api.app import create_app
from api.config import Settings, settings_to_start
from api.protocol import (
    EXIT_STOPPED,
)
from api.runtime import Runtime
from api.worker.connections import ApiChannel, server_options
from api.worker.process import configure_logging
from api.worker.supervised import run_supervised

log = logging.getLogger("api.worker")  # one logger name for the whole worker, as its log lines show


# -- standalone


def serve(settings: Settings) -> int:
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    server = waitress.create_server(app, host=settings.listen_ip, port=settings.listen_port, **server_options(settings))
    server.channel_class = ApiChannel
    loader = threading.Thread(target=_load, args=(runtime,), name="model-loader", daemon=True)
    loader.start()
    log.info("listening on http://%s:%d", settings.listen_ip, settings.listen_port)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return EXIT_STOPPED


def _load(runtime: Runtime) -> None:
    try:
        runtime.load()
        log.info("model %s loaded; ready", runtime.settings.model_name)
    except Exception as error:
        log.error("model could not be loaded: %s", error)


def run_forked(argv: list[str], public: socket.socket, output: socket.socket, commands: socket.socket) -> None:
    """Entry of a worker forked by the supervisor's fork server (WORKER_START_METHOD=forkserver):
    the same worker, with its output and commands on socket pairs instead of pipes."""
    os.setpgid(0, 0)  # a process group of its own, as the spawned workers get
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.dup2(output.fileno(), 1)  # Python's and C's stdout and stderr, llama.cpp's included
    os.dup2(output.fileno(), 2)
    output.close()
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=True)
    args = parse_args([*argv, "--listen-fd", str(public.fileno())])
    sys.exit(run_supervised(args, public, commands.makefile("rb")))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api", description="A GPT4All API worker.")
    parser.add_argument("--worker-id", type=int, help="set by the supervisor: run as its worker number K")
    parser.add_argument("--sentinel", type=Path, help="the sentinel file to report to")
    parser.add_argument("--listen-fd", type=int, help="inherited listening socket (POSIX)")
    parser.add_argument("--listen-share", action="store_true", help="read the socket.share() bytes from stdin (Windows)")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid")
    parser.add_argument("--restart-after", type=int, default=0, help="exit after this many inference requests (0: never)")
    args = parser.parse_args(argv)
    if args.worker_id is not None and (args.sentinel is None or (args.listen_fd is None and not args.listen_share)):
        parser.error("--worker-id needs --sentinel and --listen-fd or --listen-share")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker_id is not None:
        return run_supervised(args)
    settings = settings_to_start()
    configure_logging(settings)
    return serve(settings)
