"""The contract between the supervisor and its workers, kept in one light module both import.

A worker tells the supervisor how it is doing through its *sentinel file*, a small JSON document in
the run folder that it rewrites atomically (temporary file + `os.replace`), so a reader sees either
the old or the new content and never half of one. The supervisor tells a worker what to do through
*command lines* on the worker's stdin; end of file on stdin means the supervisor is gone. How a
worker ended is told by its *exit code*, which the supervisor reads from the reaped process, never
from a leftover file.

No gpt4all, Flask or waitress here: the supervisor imports this module.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


class WorkerState(str, enum.Enum):
    """What a worker says it is doing (the sentinel's `state`)."""

    BOOTING = "BOOTING"  # loading its model; not accepting connections
    READY = "READY"  # loaded and accepting connections on the public socket
    BUSY = "BUSY"  # running an inference; not accepting; will be READY again afterwards
    DRAINING = "DRAINING"  # not accepting; exits once its in-flight requests are answered


class Command(str, enum.Enum):
    """Lines the supervisor writes to a worker's stdin (`drain <reason>` carries a reason)."""

    DRAIN = "drain"  # finish the current request, then exit with EXIT_DRAINED
    STOP = "stop"  # stop accepting, finish in-flight requests, exit with EXIT_STOPPED


# -- exit codes of a worker process

EXIT_STOPPED = 0
"""Stopped on the supervisor's `stop` command."""
EXIT_CONFIG = 2
"""The configuration (environment or .env) could not be used; the message is on stderr."""
EXIT_SERVED = 10
"""Served its RESTART_AFTER_REQUESTS inference requests: the expected end of a worker's life."""
EXIT_MODEL_LOAD_FAILED = 11
"""The model could not be loaded; the sentinel's `reason` says why."""
EXIT_DRAINED = 12
"""Recycled early: drained on the supervisor's request (memory) or after a generation timed out."""
EXIT_ORPHANED = 13
"""The supervisor went away (stdin reached end of file)."""
EXIT_BAD_SOCKET = 14
"""The listening socket handed over by the supervisor could not be used."""

CLEAN_EXITS = frozenset({EXIT_SERVED, EXIT_DRAINED})
"""Exits the supervisor expects from a worker it did not ask to stop: no incident, no backoff."""

EXIT_MEANINGS = {
    EXIT_STOPPED: "stopped on request",
    EXIT_CONFIG: "the configuration is invalid",
    EXIT_SERVED: "served its requests",
    EXIT_MODEL_LOAD_FAILED: "the model could not be loaded",
    EXIT_DRAINED: "recycled",
    EXIT_ORPHANED: "its supervisor went away",
    EXIT_BAD_SOCKET: "the listening socket could not be used",
}


SIGNAL_MEANINGS = {
    # The model file is memory-mapped: a file overwritten or truncated in place under a running
    # worker turns its next read of those pages into SIGBUS. Replacing a file by rename is safe.
    "SIGBUS": "a mapped file changed under it: was the model file overwritten in place? "
              "replace model files by copying to a new name and renaming it over the old one",
}


def describe_exit(returncode: int) -> str:
    """`returncode` as Popen reports it (negative: killed by that signal), in words."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        meaning = SIGNAL_MEANINGS.get(name)
        return f"killed by {name}" + (f" ({meaning})" if meaning else "")
    meaning = EXIT_MEANINGS.get(returncode)
    return f"exited with code {returncode}" + (f" ({meaning})" if meaning else "")


def describe_failure_for_clients(returncode: int, doing: str) -> str:
    """How a worker failed, in words any client may read: no pid, exit code or path (the log has
    those). `doing` says when, as WorkerHandle.doing() does ("while loading its model")."""
    if returncode == EXIT_MODEL_LOAD_FAILED:
        return "the model could not be loaded"
    if returncode == EXIT_CONFIG:
        return "the configuration is invalid"
    if returncode < 0:
        return f"a worker crashed {doing}"
    return f"a worker exited unexpectedly {doing}"


# -- the sentinel file

SENTINEL_PREFIX = "worker-"
SENTINEL_SUFFIX = ".json"


def sentinel_path(run_dir: Path, worker_id: int) -> Path:
    return run_dir / f"{SENTINEL_PREFIX}{worker_id}{SENTINEL_SUFFIX}"


def is_sentinel_name(name: str) -> bool:
    return name.startswith(SENTINEL_PREFIX) and name.endswith(SENTINEL_SUFFIX)


@dataclass(frozen=True)
class Sentinel:
    """One worker's report of itself. Times are wall-clock seconds, for the people reading logs;
    the supervisor measures stalls with its own clock from changes of `progress`."""

    worker_id: int
    pid: int
    state: WorkerState
    requests_served: int = 0  # answered with success (2xx/3xx): what tells the supervisor the model works
    generating: bool = False  # an inference is running right now
    inferences: int = 0  # inferences started (one HTTP request may run several: OpenAI's n)
    progress: int = 0  # bumped (at most every PROGRESS_WRITE_INTERVAL) while tokens come
    last_token_at: float | None = None
    control_port: int | None = None  # loopback port serving the same app, for health probes
    reason: str = ""  # why it is DRAINING, or why the model could not be loaded
    updated_at: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Sentinel:
        """Parse a sentinel; ValueError if it is not one."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a sentinel is a JSON object")
        try:
            return cls(
                worker_id=int(data["worker_id"]),
                pid=int(data["pid"]),
                state=WorkerState(data["state"]),
                requests_served=int(data.get("requests_served", 0)),
                generating=bool(data.get("generating", False)),
                inferences=int(data.get("inferences", 0)),
                progress=int(data.get("progress", 0)),
                last_token_at=None if data.get("last_token_at") is None else float(data["last_token_at"]),
                control_port=None if data.get("control_port") is None else int(data["control_port"]),
                reason=str(data.get("reason", "")),
                updated_at=float(data.get("updated_at", 0.0)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a sentinel: {error}") from None

    def stamped(self) -> Sentinel:
        return replace(self, updated_at=time.time())

    def summary(self) -> str:
        """The sentinel as one readable sentence, for incident logs."""
        parts = [f"state {self.state.value}", f"{self.requests_served} request(s) served"]
        if self.generating:
            parts.append("generating")
        if self.last_token_at is not None:
            parts.append(f"last token at {time.strftime('%H:%M:%S', time.localtime(self.last_token_at))}"
                         f".{int(self.last_token_at % 1 * 1000):03d}")
        if self.reason:
            parts.append(f"reason: {self.reason}")
        if self.updated_at:
            parts.append(f"written {time.strftime('%H:%M:%S', time.localtime(self.updated_at))}")
        return ", ".join(parts)


_REPLACE_ATTEMPTS = 20  # Windows refuses os.replace while a reader has the file open: retry briefly


def write_sentinel(path: Path, sentinel: Sentinel) -> None:
    """Write atomically: readers see the old content or the new, never a torn file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(sentinel.stamped().to_json(), encoding="utf-8")
    for attempt in range(_REPLACE_ATTEMPTS):
        try:
            os.replace(temporary, path)
            return
        except PermissionError:
            if attempt == _REPLACE_ATTEMPTS - 1:
                raise
            time.sleep(0.005)


def read_sentinel(path: Path) -> Sentinel | None:
    """The sentinel at `path`, or None if there is none (yet) or it cannot be read."""
    try:
        return Sentinel.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
