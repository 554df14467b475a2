"""One log writer for the whole service.

The supervisor's own log records and every line its workers print (stdout and stderr share one
pipe per worker, so llama.cpp's C-level stderr comes through too) go into one queue; a single
listener thread writes them to `LOG_FOLDER_NAME/gpt4all-api.log` with size-based rotation and to
the console. Each line is stamped and tagged with where it came from:

    2026-11-21 08:29:37,742 [supervisor] ERROR worker 3 (pid 9501) killed by SIGKILL ...
    2026-11-21 08:29:37,764 [worker 4 pid 9533] INFO api.worker: model tiny-chat.gguf loaded; ...
    2026-11-21 08:29:37,750 [worker 4 pid 9533] Failed to load libllamamodel-mainline-cuda.so: ...

A pipe is read from the moment its worker starts until end of file, so a chatty worker can never
block on a full pipe.

A log file that cannot be written (a full disk, say) never stops the service and never floods the
console: the console gets one warning, the records that cannot be written are counted, and the
count goes into the file once it can be written again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from api.request_log import iso_time

LOG_FILE_NAME = "gpt4all-api.log"
MAX_LINE_BYTES = 16384  # a longer line (llama.cpp progress dots) is written in pieces


class TaggedFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(tag)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "tag"):
            record.tag = f"[supervisor] {record.levelname}"
        return super().format(record)


class JsonLineFormatter(logging.Formatter):
    """LOG_FORMAT=json: a worker's JSON lines as they are; its other lines (llama.cpp's) and the
    supervisor's records as JSON objects of the same fields."""

    TAG = re.compile(r"\[(worker \d+) pid (\d+)\]")

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", None)
        message = record.getMessage()
        if tag is not None and message.startswith("{") and message.endswith("}"):
            return message
        found = self.TAG.fullmatch(tag) if tag else None
        line = {"time": iso_time(record.created),
                "level": record.levelname, "worker": found.group(1) if found else "supervisor",
                "pid": int(found.group(2)) if found else os.getpid(), "logger": record.name, "message": message}
        return json.dumps(line, ensure_ascii=False)


def supervisor_record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("supervisor", level, "", 0, message, None, None)


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """The rotating log file, for which a failed write is an event to count, not a traceback.

    `tell` reaches the console. It hears of the first failure, of the recovery, and of records
    still unwritten at the end; a failure that comes back within CONSOLE_QUIET seconds of the
    last warning is only counted (a disk that hovers at full must not flood the console either).
    """

    CONSOLE_QUIET = 300.0

    def __init__(self, path: Path, *, max_bytes: int, backups: int,
                 tell: Callable[[logging.LogRecord], object]) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._tell = tell
        self.dropped = 0  # records not written since the file last worked
        self._error: BaseException | None = None  # why the last write failed
        self._console_told_at: float | None = None  # when the console last heard of a failure
        self._console_knows = False  # it heard of the current one (so it hears of the recovery too)

    def emit(self, record: logging.LogRecord) -> None:
        if self.dropped and not self._report_recovery():
            self.dropped += 1
            return
        if not self._write(record):
            if not self.dropped:
                self._warn_console()
            self.dropped += 1

    def _write(self, record: logging.LogRecord) -> bool:
        self._error = None
        super().emit(record)  # calls handleError() on failure
        return self._error is None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging.Handler's name
        """A write, flush, rotation or reopening failed: remember why, drop the stream with what it
        buffered, and reopen the file at the next record."""
        self._error = sys.exc_info()[1] or OSError("unknown error")
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    def _warn_console(self) -> None:
        now = time.monotonic()
        if self._console_told_at is not None and now - self._console_told_at < self.CONSOLE_QUIET:
            return
        self._console_told_at = now
        self._console_knows = True
        self._tell(supervisor_record(logging.WARNING, (
            f"cannot write the log file {self.baseFilename}: {self._error}. The service goes on; log records "
            "are dropped, and counted, until the file can be written again.")))

    def _report_recovery(self) -> bool:
        """Write how many records were lost; False if the file still cannot be written."""
        why = self._error
        note = supervisor_record(logging.WARNING, f"the log file can be written again: {self.dropped} log record(s) "
                                                  f"were dropped while it could not ({why})")
        if not self._write(note):
            return False
        self.dropped = 0
        if self._console_knows:
            self._console_knows = False
            self._tell(note)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the last flush may meet the same full disk
            super().close()
        if self.dropped:
            self._tell(supervisor_record(logging.WARNING, (
                f"{self.dropped} log record(s) could not be written to the log file {self.baseFilename} "
                f"({self._error})")))
            self.dropped = 0


class LogWriter:
    def __init__(self, folder: Path, *, max_bytes: int, backups: int, level: int = logging.INFO,
                 console: IO[str] | None = sys.stderr, json_lines: bool = False) -> None:
        """Raises OSError if the log file cannot be created or opened in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOG_FILE_NAME
        self.level = level
        self.queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        formatter = JsonLineFormatter() if json_lines else TaggedFormatter()
        console_handler = logging.StreamHandler(console) if console is not None else None
        handlers: list[logging.Handler] = [LogFileHandler(
            self.path, max_bytes=max_bytes, backups=backups,
            tell=console_handler.handle if console_handler else lambda _record: None)]
        if console_handler is not None:
            handlers.append(console_handler)
        for handler in handlers:
            handler.setFormatter(formatter)
        self.handlers = handlers
        self.listener = logging.handlers.QueueListener(self.queue, *handlers)
        self.readers: list[threading.Thread] = []
        self._queue_handler = logging.handlers.QueueHandler(self.queue)

    def start(self) -> LogWriter:
        """Start the writer thread and route the supervisor's own logging through it."""
        self.listener.start()
        root = logging.getLogger()
        root.addHandler(self._queue_handler)
        root.setLevel(self.level)
        return self

    @property
    def running(self) -> bool:
        """Whether the writer thread runs (QueueListener keeps it private)."""
        thread = getattr(self.listener, "_thread", None)
        return thread is not None and thread.is_alive()

    def follow(self, stream: IO[bytes], tag: str, on_eof: Callable[[], None] = lambda: None) -> None:
        """Read `stream` line by line until it closes, writing each line tagged `[tag]`."""
        reader = threading.Thread(target=self._pump, args=(stream, f"[{tag}]", on_eof), name=f"log {tag}", daemon=True)
        self.readers = [thread for thread in self.readers if thread.is_alive()]
        self.readers.append(reader)
        reader.start()

    def _pump(self, stream: IO[bytes], tag: str, on_eof: Callable[[], None]) -> None:
        try:
            with stream:
                for raw in iter(lambda: stream.readline(MAX_LINE_BYTES), b""):
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    record = logging.LogRecord("worker", logging.INFO, "", 0, line, None, None)
                    record.tag = tag
                    self.queue.put(record)
        except (OSError, ValueError):
            pass  # the pipe broke or was closed under us: nothing more to read
        finally:
            on_eof()

    def stop(self, timeout: float = 2.0) -> None:
        """Let the readers reach end of file (their workers are gone), then flush and close."""
        for reader in self.readers:
            reader.join(timeout)
        logging.getLogger().removeHandler(self._queue_handler)
        self.listener.stop()
        for handler in self.handlers:
            handler.close()
