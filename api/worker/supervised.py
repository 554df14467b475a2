"""A worker under the supervisor: the lifecycle wired to waitress, the model loader, the
supervisor's commands and the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import BinaryIO

import waitress
from waitress import wasyncore

from api.accept_gate import AcceptGate
from api.app import create_app
from api.config import ConfigError, Settings, check_model_files, load_settings
from api.inference_slots import InferenceSlots
from api.protocol import (
    EXIT_BAD_SOCKET,
    EXIT_CONFIG,
    EXIT_DRAINED,
    EXIT_MODEL_LOAD_FAILED,
    EXIT_ORPHANED,
    EXIT_STOPPED,
    Command,
)
from api.runtime import Runtime
from api.worker.connections import WorkerChannel, bound_channel, readable_now, server_options
from api.worker.lifecycle import WorkerLifecycle
from api.worker.process import configure_logging, die_with_parent, inherit_listening_socket, lower_this_threads_priority, name_process

log = logging.getLogger("api.worker")  # one logger name for the whole worker, as its log lines show

CONTROL_THREADS = 2  # the control port serves health probes
EXIT_CHECK_INTERVAL = 0.05


class SupervisedWorker:
    """Wires a WorkerLifecycle to waitress, the model loader, stdin commands and the exit."""

    def __init__(self, settings: Settings, lifecycle: WorkerLifecycle, public: socket.socket,
                 commands: BinaryIO) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.commands = commands
        slots = InferenceSlots(settings.run_dir, settings.workers, max_queue=settings.max_queue,
                               queue_timeout=settings.queue_timeout)
        self.runtime = Runtime(settings, lifecycle, slots)
        self.runtime.stopping = lambda: lifecycle.exit_code == EXIT_STOPPED
        if slots.queue is not None:
            slots.queue.stopping = self.runtime.stopping  # waiters get a 503 at once instead of being cut off
        app = create_app(settings, self.runtime)
        # Two servers, each with its own loop and threads: health probes on the control port never
        # queue behind requests waiting for the model on the public socket (a false "hung").
        self.public_server = waitress.create_server(app, sockets=[public], **server_options(settings))
        control = socket.create_server(("127.0.0.1", 0))
        lifecycle.control_port = control.getsockname()[1]
        self.control_server = waitress.create_server(
            app, sockets=[control], **{**server_options(settings), "threads": CONTROL_THREADS})
        self.public_server.channel_class = bound_channel(lifecycle, one_client_at_a_time=True)
        self.control_server.channel_class = bound_channel(lifecycle, one_client_at_a_time=False)
        self.public_server.accepting = False  # not before the model is loaded
        lifecycle.set_accepting = self._set_accepting

    def _set_accepting(self, accepting: bool) -> None:
        self.public_server.accepting = accepting
        self.public_server.pull_trigger()  # wake its loop so select() sees the change now

    def _stop_listening(self) -> None:
        """Close our copy of the public socket (in its loop thread), so that once every process
        has closed its copy, new clients are refused instead of waiting for a stopping service.
        The base close, not the server's: its trigger stays open for the connections in flight."""
        def close() -> None:
            if self.public_server.socket is not None:
                wasyncore.dispatcher.close(self.public_server)

        self.public_server.trigger.pull_trigger(close)

    def run(self) -> int:
        self.lifecycle.report()
        for target, name in ((self._load, "model-loader"), (self._read_commands, "commands"),
                             (self._watch_for_exit, "exit-watcher"), (self.control_server.run, "control-server")):
            threading.Thread(target=target, name=name, daemon=True).start()
        self.public_server.run()
        return EXIT_STOPPED

    def _load(self) -> None:
        lower_this_threads_priority()
        try:
            check_model_files(self.settings)
            self.runtime.load()
        except Exception as error:
            log.error("the model could not be loaded: %s", error)
            self.lifecycle.load_failed(f"a model could not be loaded: {error}")
            return
        log.info("model %s loaded; worker %d ready", self.settings.model_name, self.lifecycle.worker_id)
        self.lifecycle.ready()

    def _read_commands(self) -> None:
        for raw in self.commands:
            command, _, reason = raw.decode("utf-8", "replace").strip().partition(" ")
            if command == Command.DRAIN.value:
                self.lifecycle.drain(EXIT_DRAINED, reason or "the supervisor asked")
            elif command == Command.STOP.value:
                self.lifecycle.drain(EXIT_STOPPED, "the supervisor is stopping")
                self._stop_listening()
            elif command:
                log.warning("unknown command from the supervisor: %r", command)
        log.warning("the command pipe closed: the supervisor is gone; exiting")
        self._exit(EXIT_ORPHANED)

    def _watch_for_exit(self) -> None:
        lifecycle = self.lifecycle
        while True:
            lifecycle.changed.wait(EXIT_CHECK_INTERVAL)
            lifecycle.changed.clear()
            lifecycle.check_overtime()
            self._review_connections()
            code = lifecycle.exit_code
            if code == EXIT_MODEL_LOAD_FAILED:
                self._exit(code)
            if code is not None and lifecycle.idle() and not self.public_server.active_channels:
                log.info("worker %d exits: %s", lifecycle.worker_id, lifecycle.reason)
                self._exit(code)

    def _review_connections(self) -> None:
        """A connection that has sent no request within FRESH_CONNECTION_GRACE no longer holds the
        worker: an idle or stray connection must not keep every other client waiting. Connections
        to close are handed to the loop thread, which closes those still idle."""
        now = time.time()
        channels = list(self.public_server.active_channels.values())
        for channel in channels:
            if channel.missed_first_request(now):
                self.lifecycle.client_went_silent(channel.client_key)
        to_close = self._connections_to_close(channels, now)
        if to_close:
            self.public_server.trigger.pull_trigger(lambda: [channel.close_if_idle() for channel in to_close])

    def _connections_to_close(self, channels: list[WorkerChannel], now: float) -> list[WorkerChannel]:
        idle = [channel for channel in channels if channel.closable(now)]
        if self.lifecycle.exit_code is not None:
            # Draining: it exits once every connection is closed; one that just connected gets its grace.
            return [channel for channel in idle if not channel.awaiting_first_request(now)]
        to_close = [channel for channel in idle if channel.silent_too_long(now)]
        if self.public_server.in_connection_overflow and readable_now(self.public_server.socket):
            # At waitress's connection limit with a client waiting to be accepted: the silent
            # connections have had their chance; failing those, the longest-idle kept-alive one goes.
            silent = [channel for channel in idle if channel.missed_first_request(now)]
            kept_alive = [channel for channel in idle if not channel.awaiting_first_request(now)]
            to_close += silent or sorted(kept_alive, key=lambda channel: channel.last_activity)[:1]
        return to_close

    @staticmethod
    def _exit(code: int) -> None:
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_supervised(args: argparse.Namespace, public: socket.socket | None = None,
                   commands: BinaryIO | None = None) -> int:
    """Run as the supervisor's worker: `public` and `commands` are given when forked, else they
    come from the arguments and stdin."""
    die_with_parent(args.parent_pid)
    name_process(args.worker_id)
    # Signals from a terminal reach the whole process group; the supervisor decides for us.
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if public is None:
        try:
            public = inherit_listening_socket(args)
        except (OSError, ValueError) as error:
            print(f"worker {args.worker_id}: cannot use the listening socket: {error}", file=sys.stderr)
            return EXIT_BAD_SOCKET
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings, supervised=True, worker=f"worker {args.worker_id}")
    lifecycle = WorkerLifecycle(
        args.worker_id, args.sentinel, restart_after=args.restart_after,
        request_timeout=settings.request_timeout, stall_timeout=settings.stall_timeout,
        wait_for_gate=AcceptGate(settings.run_dir).wait_until_open,
    )
    return SupervisedWorker(settings, lifecycle, public, commands or sys.stdin.buffer).run()
