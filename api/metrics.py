"""The service's Prometheus metrics: their names, who records them, and the one exposition.

Workers come and go (by default one per request), so every process records into
prometheus-client's multiprocess files in one folder of the run folder (`metrics/`), which the
supervisor empties when it starts; whoever answers `GET /metrics` (a worker, or the supervisor's
503 fallback while no worker is up) reads the whole folder. Counters therefore never reset when
a worker is replaced.

Each dead worker leaves its files behind, and a scrape reads every file: after hundreds of
workers that costs hundreds of milliseconds. The supervisor compacts them (`Compactor`): every
COMPACT_EVERY dead workers it adds their counters and histograms into one generation of compacted
files and deletes them. A generation (`compacted/<n>/`) becomes visible at once, with the list of
the files it took in, so a scrape never counts a file twice nor misses it while compaction runs.

Gauges (workers by state, generations running, clients waiting, memory) are set by the
supervisor alone from what its loop sees, so they need no cleaning after a worker dies.

This module imports neither Flask nor gpt4all: the supervisor uses it too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
METRICS_FOLDER = "metrics"
COMPACTED_FOLDER = "compacted"
MANIFEST = "merged.json"
COMPACT_EVERY = 50  # dead workers whose files are compacted at a time
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "gpt4all_"

# Seconds: from a pause below a millisecond (an idle slot) to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STARTUP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)

log = logging.getLogger("supervisor")  # compaction runs in the supervisor's loop

EXIT_REASONS = ("served", "recycled", "crashed", "hung", "bloated", "reload", "load_failed", "stopped")


def prepare_folder(run_dir: Path) -> Path:
    """The supervisor, at start: an empty metrics folder, named in the environment its workers inherit."""
    folder = run_dir / METRICS_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_VARIABLE] = str(folder)
    return folder


def metrics_folder() -> Path | None:
    folder = os.environ.get(MULTIPROC_VARIABLE)
    return Path(folder) if folder else None


class Meters:
    """Every metric of the service. Built on first use (`meters()`), after the supervisor has
    named the folder, so that prometheus-client picks its multiprocess values then."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        if metrics_folder() is not None:
            values.ValueClass = values.MultiProcessValue()
        # -- recorded by the workers, per request
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests answered by the workers.",
                                ("route", "status", "wire_format"))
        self.request_seconds = Histogram(PREFIX + "http_request_duration_seconds",
                                         "From the request's arrival to the last byte of its response.",
                                         ("wire_format",), buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens evaluated.", ("model",))
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens generated.", ("model",))
        self.first_token_seconds = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "From the request's arrival to its first piece of generated text.",
                                             buckets=LATENCY_BUCKETS)
        self.queue_seconds = Histogram(PREFIX + "queue_wait_seconds", "Time spent waiting for an inference slot.",
                                       buckets=LATENCY_BUCKETS)
        # -- recorded by the supervisor
        self.generations_running = Gauge(PREFIX + "generations_running", "Generations running now.",
                                         multiprocess_mode="mostrecent")
        self.clients_waiting = Gauge(PREFIX + "clients_waiting", "Clients waiting in line for an inference slot.",
                                     multiprocess_mode="mostrecent")
        self.workers = Gauge(PREFIX + "workers", "Worker processes by state.", ("state",),
                             multiprocess_mode="mostrecent")
        self.worker_exits = Counter(PREFIX + "worker_exits", "Worker processes that ended, by reason.", ("reason",))
        self.worker_startup_seconds = Histogram(PREFIX + "worker_startup_seconds",
                                                "From a worker's start to its model being loaded and READY.",
                                                buckets=STARTUP_BUCKETS)
        self.worker_memory = Gauge(PREFIX + "worker_memory_uss_bytes",
                                   "Memory only the largest live worker uses (USS; shared model pages excluded).",
                                   multiprocess_mode="mostrecent")
        self.model_load_failures = Counter(PREFIX + "model_load_failures", "Workers that could not load their model.")
        self.fallback_responses = Counter(PREFIX + "fallback_responses",
                                          "Answers of the supervisor's fallback while no worker could serve, by status.",
                                          ("status",))


_meters: Meters | None = None
_meters_lock = threading.Lock()


def meters() -> Meters:
    global _meters
    if _meters is None:
        with _meters_lock:
            if _meters is None:
                _meters = Meters()
    return _meters


# -- exposition


def exposition() -> bytes:
    """The text format of every metric of the service (this process's only, outside the supervisor)."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    meters()  # every metric exists, at zero, before its first use
    folder = metrics_folder()
    if folder is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    registry.register(FolderCollector(folder))
    return generate_latest(registry)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    files: list[str]


_HEADER_BYTES = 8  # prometheus-client's file header: the used length, then padding


def live_files(folder: Path) -> list[str]:
    """The processes' own files, except one a starting process has created but not sized yet: it
    holds no sample, and prometheus-client's reader fails on a file shorter than its header."""
    return [path for path in glob.glob(os.path.join(folder, "*.db")) if _initialised(path)]


def _initialised(path: str) -> bool:
    try:
        return os.path.getsize(path) >= _HEADER_BYTES
    except OSError:
        return True  # gone meanwhile: the collector's retry on FileNotFoundError handles that


def newest_generation(folder: Path) -> tuple[int, set[str]]:
    """The newest complete compacted generation and the names of the files it took in."""
    best, merged = 0, set()
    for entry in glob.glob(os.path.join(folder, COMPACTED_FOLDER, "*", MANIFEST)):
        number = int(Path(entry).parent.name)
        if number > best:
            with contextlib.suppress(OSError, ValueError):
                merged = set(json.loads(Path(entry).read_text()))
                best = number
    return best, merged


def snapshot(folder: Path) -> Snapshot:
    """The files a scrape reads: the newest compacted generation and the files it did not take in."""
    live = live_files(folder)  # listed before the generation: a file it took in is then excluded
    generation, merged = newest_generation(folder)
    files = [path for path in live if os.path.basename(path) not in merged]
    if generation:
        files += glob.glob(os.path.join(folder, COMPACTED_FOLDER, str(generation), "*.db"))
    return Snapshot(generation, files)


class FolderCollector:
    """prometheus-client's MultiProcessCollector over `snapshot()`: retried if compaction ran
    (and deleted files) while it read."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        for attempt in range(3):
            taken = snapshot(self.folder)
            try:
                metrics = list(MultiProcessCollector.merge(taken.files, accumulate=True))
            except FileNotFoundError:
                if attempt == 2:
                    raise  # compaction kept deleting what we read: an error, not a silently short answer
                continue
            if newest_generation(self.folder)[0] == taken.generation:
                return metrics
        return metrics


# -- compaction (the supervisor)


def files_of(folder: Path, pids: Iterable[int]) -> list[str]:
    """The files these processes wrote. (A worker's gauge files hold only the zeros of gauges the
    supervisor alone sets: compaction deletes them without merging.)"""
    wanted = {str(pid) for pid in pids}
    return [path for path in live_files(folder) if Path(path).stem.rsplit("_", 1)[-1] in wanted]


def summed_values(paths: Iterable[str]) -> dict[str, dict[str, float]]:
    """Values by key, added up over `paths`, per type (counter, histogram): raw mmap values, so a
    histogram's buckets add up like counters (they are accumulated only when exposed)."""
    from prometheus_client.mmap_dict import MmapedDict

    sums: dict[str, dict[str, float]] = {"counter": {}, "histogram": {}}
    for path in paths:
        kind = Path(path).name.split("_", 1)[0]
        if kind not in sums:
            continue
        with contextlib.suppress(FileNotFoundError):
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
                sums[kind][key] = sums[kind].get(key, 0.0) + value
    return sums


class Compactor:
    """Merges the files of dead workers into one compacted generation, COMPACT_EVERY at a time."""

    def __init__(self, folder: Path, every: int = COMPACT_EVERY) -> None:
        self.folder = folder
        self.every = every
        self.dead: list[int] = []
        self.due = every  # dead workers at which the next compaction runs
        self.generation = 0

    def worker_gone(self, pid: int) -> None:
        """Called by the supervisor's loop: a compaction that fails (a full disk, say) is logged and
        tried again `every` deaths later; it must never stop the loop, and loses nothing
        (the dead workers' files stay and are scraped as they are)."""
        self.dead.append(pid)
        if len(self.dead) < self.due:
            return
        try:
            self.compact()
        except OSError as error:
            log.warning("could not compact the metrics of %d dead workers (a scrape reads their files as they are; "
                        "tried again later): %s", len(self.dead), error)
            self.due = len(self.dead) + self.every

    def compact(self) -> None:
        """The dead workers' files and the last generation, added up into the next generation. The
        state (which generation is current, which pids are left) changes only once it is in place."""
        from prometheus_client.mmap_dict import MmapedDict

        dead_files = files_of(self.folder, self.dead)
        previous = self.generation_folder(self.generation) if self.generation else None
        inputs = dead_files + (glob.glob(os.path.join(previous, "*.db")) if previous else [])
        number = self.generation + 1
        building = self.folder / COMPACTED_FOLDER / f".building-{number}"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        for kind, values in summed_values(inputs).items():
            if values:
                table = MmapedDict(str(building / f"{kind}_compacted.db"))
                for key, value in values.items():
                    table.write_value(key, value, 0.0)
                table.close()
        (building / MANIFEST).write_text(json.dumps(sorted(os.path.basename(path) for path in dead_files)))
        os.replace(building, self.generation_folder(number))  # visible at once, manifest included
        self.generation, self.dead, self.due = number, [], self.every
        for path in dead_files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if previous:
            shutil.rmtree(previous, ignore_errors=True)

    def generation_folder(self, number: int) -> str:
        return str(self.folder / COMPACTED_FOLDER / str(number))


class SupervisorMeters:
    """What the supervisor's arbiter records (its `Meters` protocol), and the compaction of dead
    workers' files."""

    def __init__(self, folder: Path) -> None:
        self.meters = meters()
        self.compactor = Compactor(folder)
        self._states: dict[str, int] = {}

    def worker_started(self, seconds: float) -> None:
        self.meters.worker_startup_seconds.observe(seconds)

    def worker_exited(self, pid: int, reason: str) -> None:
        self.meters.worker_exits.labels(reason).inc()
        if reason == "load_failed":
            self.meters.model_load_failures.inc()
        self.compactor.worker_gone(pid)

    def pool(self, states: dict[str, int], generating: int, waiting: int, largest_uss: int | None) -> None:
        for state in set(states) | set(self._states):
            count = states.get(state, 0)
            if self._states.get(state) != count:
                self.meters.workers.labels(state).set(count)
        self._states = dict(states)
        self.meters.generations_running.set(generating)
        self.meters.clients_waiting.set(waiting)
        if largest_uss is not None:
            self.meters.worker_memory.set(largest_uss)
