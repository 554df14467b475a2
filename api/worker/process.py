"""Process-level helpers of a worker: logging, the inherited socket, dying with the supervisor,
its name in ps and the priority of the thread that loads the model.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import signal
import socket
import sys
import threading

from api.config import Settings
from api.protocol import (
    EXIT_ORPHANED,
)

log = logging.getLogger("api.worker")  # one logger name for the whole worker, as its log lines show


def configure_logging(settings: Settings, *, supervised: bool = False, worker: str = "worker") -> None:
    """Text lines (under the supervisor, stamped and tagged by its log writer) or, with
    LOG_FORMAT=json, one JSON object per line that the log writer passes on as it is."""
    level = logging.DEBUG if settings.debug else logging.INFO
    if settings.log_format == "json":
        from api.request_log import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(worker, os.getpid()))
        logging.basicConfig(level=level, handlers=[handler])
        return
    fmt = "%(levelname)s %(name)s: %(message)s" if supervised else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def inherit_listening_socket(args: argparse.Namespace) -> socket.socket:
    """The public socket the supervisor bound: an inherited descriptor (POSIX) or, on Windows,
    `socket.share()` bytes on the first line of stdin (base64)."""
    if args.listen_fd is not None:
        return socket.socket(fileno=args.listen_fd)
    line = sys.stdin.buffer.readline()
    return socket.fromshare(base64.b64decode(line.strip()))


def die_with_parent(parent_pid: int | None) -> None:
    """On Linux, have the kernel kill us when our parent dies (even by SIGKILL). The parent is the
    supervisor, or the fork server, which exits when the supervisor does."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    expected = parent_pid or os.getppid()
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)


def name_process(worker_id: int) -> None:
    """Linux: show as `api-worker-K` in ps/top (a forked worker's command line is the fork server's)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_name = 15
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_name, f"api-worker-{worker_id}"[:15].encode(), 0, 0, 0)


def lower_this_threads_priority() -> None:
    """Load the model at the lowest CPU priority (Linux: nice is per thread, and llama.cpp's compute
    threads started from this one inherit it). A replacement loads while another worker generates;
    at equal priority their busy-waiting compute threads slow each other down several times over."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
