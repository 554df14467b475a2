"""The supervisor process: set up, run the arbiter's loop, clean up.

Setting up takes the pid file lock, binds the public socket once, starts the log writer, the
fallback responder (with the accept gate that keeps it and the workers apart) and the watch on
the run folder; then the loop runs the arbiter until it has
stopped. Signal handlers, sentinel events and worker pipes closing only wake the loop; every
decision is the arbiter's (supervisor/arbiter.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from api.accept_gate import AcceptGate
from api.access import AccessPolicy
from api.config import ConfigError, Settings, load_settings, settings_to_start
from api.metrics import SupervisorMeters, prepare_folder
from api.protocol import EXIT_CONFIG, is_sentinel_name, read_sentinel  # EXIT_CONFIG: one line printed, as a worker does
from api.slot_queue import SlotQueue, is_ticket_name
from supervisor.arbiter import Arbiter, Timing
from supervisor.fallback import FallbackResponder
from supervisor.logs import LogWriter
from supervisor.notify import SYSTEMD_VARIABLES, SystemdNotifier
from supervisor.pidfile import AlreadyRunning, PidFile
from supervisor.processes import RealProcessOps

log = logging.getLogger("supervisor")

EXIT_OK = 0
EXIT_FAILURE = 1  # the supervisor itself failed (a bug): systemd's Restart=on-failure applies
EXIT_CANNOT_START = 3  # another supervisor holds the pid file, or the port is taken

HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK")  # those this platform has


class StartupError(Exception):
    """Why the supervisor cannot start, as one line for the user."""


class Waker:
    """Wakes the loop from signal handlers and other threads: a byte on a socket pair, which takes
    no lock (an Event could deadlock when set from a signal handler)."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._writer.send(b"\0")

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(OSError):
            if select.select([self._reader], [], [], timeout)[0]:
                while self._reader.recv(4096):
                    pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def bind_listener(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.listen_ip else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "nt":  # an exclusive bind: Windows' SO_REUSEADDR would let another server share the port
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        else:  # restart at once even while old connections linger in TIME_WAIT
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((settings.listen_ip, settings.listen_port))
        listener.listen(1024)
    except OSError as error:
        listener.close()
        raise StartupError(f"cannot listen on {settings.listen_ip}:{settings.listen_port}: {error.strerror or error}; "
                           "is another server running there? Stop it or set LISTEN_PORT") from None
    listener.setblocking(False)  # workers (waitress) and the fallback accept without blocking
    return listener


@contextlib.contextmanager
def unwritable_folder_is_a_config_error(key: str, folder: Path) -> Iterator[None]:
    """A folder setting the supervisor cannot write in gets the one-line message of any bad setting."""
    try:
        yield
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise ConfigError(key, str(folder), f"a folder this service can write in ({where}{error.strerror or error})") from None


class Supervisor:
    def __init__(self, settings: Settings, *, control_stdin: bool = False) -> None:
        self.settings = settings
        self.control_stdin = control_stdin
        self.waker = Waker()

    def run(self) -> int:
        settings = self.settings
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.waker.close)
            pid_file = PidFile(settings.run_dir)
            with unwritable_folder_is_a_config_error("WATCHDOG_TEMPFILE", settings.run_dir):
                pid_file.acquire()
            cleanup.callback(pid_file.release)
            listener = bind_listener(settings)
            cleanup.callback(listener.close)
            with unwritable_folder_is_a_config_error("LOG_FOLDER_NAME", settings.log_dir):
                logs = LogWriter(settings.log_dir, max_bytes=settings.log_max_bytes, backups=settings.log_backups,
                                 level=logging.DEBUG if settings.debug else logging.INFO,
                                 json_lines=settings.log_format == "json")
            logs.start()
            cleanup.callback(logs.stop)
            self.clear_stale_sentinels()
            meters = SupervisorMeters(prepare_folder(settings.run_dir))  # before any worker: they inherit its name
            notify = SystemdNotifier()
            cleanup.callback(notify.close)
            for name in SYSTEMD_VARIABLES:  # meant for this process: no worker may inherit them
                os.environ.pop(name, None)
            ops = RealProcessOps(listener, settings.run_dir, logs, method=settings.worker_start_method,
                                 on_exit=self.waker.wake)
            cleanup.callback(ops.close)
            self.fallback = FallbackResponder(listener, AccessPolicy.from_settings(settings))
            cleanup.callback(self.fallback.close)
            self.logs = logs
            self.arbiter = Arbiter(settings, ops, notify=notify, fallback=self.fallback, gate=AcceptGate(settings.run_dir),
                                   reload_settings=self.reload_settings,
                                   timing=Timing(watchdog_interval=min(1.0, notify.watchdog_interval or 1.0)),
                                   line=SlotQueue(settings.run_dir, settings.max_queue), loop_problem=self.loop_problem,
                                   meters=meters)
            cleanup.callback(self.kill_survivors)
            cleanup.enter_context(self.watching(settings.run_dir))
            self.install_signal_handlers()
            if self.control_stdin:
                threading.Thread(target=self.read_stdin_commands, name="stdin-commands", daemon=True).start()
            log.info("supervisor (pid %d) listening on http://%s:%d: %d worker(s) + %d warm spare(s), model %s, "
                     "a fresh worker after %s, workers started by %s; logs in %s", os.getpid(), settings.listen_ip,
                     settings.listen_port, settings.workers, settings.warm_spares, settings.model_name,
                     _restart_policy(settings), ops.method, logs.path)
            self.loop()
            log.info("stopped")
        return EXIT_OK

    def reload_settings(self) -> Settings:
        """SIGHUP: read the configuration again; the fallback applies the new access rules at once."""
        settings = load_settings()
        self.fallback.set_access(AccessPolicy.from_settings(settings))
        return settings

    def loop_problem(self) -> str:
        """What is wrong with the threads the loop relies on ('' if nothing): what stops WATCHDOG=1."""
        if not self.fallback.running:
            return "the 503 fallback thread has died"
        if not self.logs.running:
            return "the log writer thread has died"
        return ""

    def loop(self) -> None:
        while self.arbiter.tick():
            self.waker.wait(self.arbiter.timing.tick)

    # -- waking the loop

    def watching(self, run_dir: Path) -> contextlib.AbstractContextManager[object]:
        """Sentinel changes wake the loop at once (the loop still reads every sentinel each tick)."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        waker = self.waker

        class SentinelEvents(FileSystemEventHandler):
            # Only writes: the loop's own reads raise "opened"/"closed_no_write" events, and
            # waking on those would make the loop wake itself forever. Tickets of the line for a
            # slot wake it too: the overload fallback follows the line's length.
            WAKING = frozenset({"moved", "created", "modified", "deleted"})

            def on_any_event(self, event: FileSystemEvent) -> None:
                path = event.dest_path if event.event_type == "moved" else event.src_path
                name = os.path.basename(os.fsdecode(path))
                if event.event_type in self.WAKING and (is_sentinel_name(name) or is_ticket_name(name)):
                    waker.wake()

        observer = Observer()
        observer.schedule(SentinelEvents(), str(run_dir), recursive=False)
        observer.daemon = True
        observer.start()

        @contextlib.contextmanager
        def running() -> object:
            try:
                yield observer
            finally:
                observer.stop()
                observer.join(2)

        return running()

    def install_signal_handlers(self) -> None:
        for name in HANDLED_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self.queue_signal)

    def queue_signal(self, signum: int, _frame: object) -> None:
        self.arbiter.signals.append(signal.Signals(signum).name)
        self.waker.wake()

    def read_stdin_commands(self) -> None:
        """--control-stdin: `stop` or end of file stops gracefully, `reload` is a rolling restart
        (what a Windows service wrapper uses instead of signals)."""
        for line in sys.stdin:
            command = line.strip().lower()
            if command in ("stop", "reload"):
                self.arbiter.signals.append("SIGTERM" if command == "stop" else "SIGHUP")
                self.waker.wake()
        self.arbiter.signals.append("SIGTERM")
        self.waker.wake()

    # -- clean up

    def clear_stale_sentinels(self) -> None:
        """Sentinels left by an earlier run that ended abruptly: tell their story, then remove them."""
        for path in sorted(self.settings.run_dir.glob("*")):
            if not is_sentinel_name(path.name):
                continue
            sentinel = read_sentinel(path)
            if sentinel is not None:
                log.warning("found the sentinel of worker %d (pid %d) from an earlier run that did not end cleanly: %s",
                            sentinel.worker_id, sentinel.pid, sentinel.summary())
            with contextlib.suppress(OSError):
                path.unlink()

    def kill_survivors(self) -> None:
        """Only after an unexpected error: no worker outlives its supervisor."""
        for handle in self.arbiter.alive():
            log.warning("killing %s: the supervisor is exiting", handle.name)
            handle.child.kill()
            handle.child.close()


def _restart_policy(settings: Settings) -> str:
    if settings.restart_after_requests == 0:
        return "crashes and hangs only (RESTART_AFTER_REQUESTS=0)"
    if settings.restart_after_requests == 1:
        return "every inference request"
    return f"every {settings.restart_after_requests} inference requests"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="watchdog_main.py",
        description="Run the GPT4All API daemon: a supervisor that keeps model workers alive. "
                    "Configuration comes from .env and the environment (see .env.example).")
    parser.add_argument("--control-stdin", action="store_true",
                        help="also take commands on stdin: 'stop' (or end of file) and 'reload' (for service wrappers)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = settings_to_start()
    try:
        return Supervisor(settings, control_stdin=args.control_stdin).run()
    except ConfigError as error:  # a folder setting found unusable while starting
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    except (AlreadyRunning, StartupError) as error:
        print(f"gpt4all-api: {error}", file=sys.stderr)
        return EXIT_CANNOT_START
    except Exception:
        log.exception("the supervisor failed")
        logging.shutdown()
        return EXIT_FAILURE
