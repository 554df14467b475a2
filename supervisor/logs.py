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
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

LOG_FILE_NAME = "gpt4all-api.log"
MAX_LINE_BYTES = 16384  # a longer line (llama.cpp progress dots) is written in pieces


class TaggedFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(tag)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "tag"):
            record.tag = f"[supervisor] {record.levelname}"
        return super().format(record)


class LogWriter:
    def __init__(self, folder: Path, *, max_bytes: int, backups: int, level: int = logging.INFO,
                 console: IO[str] | None = sys.stderr) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOG_FILE_NAME
        self.level = level
        self.queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        formatter = TaggedFormatter()
        handlers: list[logging.Handler] = [
            logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")]
        if console is not None:
            handlers.append(logging.StreamHandler(console))
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
