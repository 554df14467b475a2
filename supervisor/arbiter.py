"""The supervisor's decisions: one `Arbiter` for the pool, one `WorkerHandle` per child process.

Each pass of the loop (`Arbiter.tick`) runs the same named steps in the same order, each a method
that tests can drive on its own: handle the queued signals, reap the workers that exited, read
every sentinel, probe health, stop hung workers, recycle bloated ones, retire workers of an old
configuration, start the missing ones, and tell clients and systemd how things stand: the 503
fallback while no worker can serve or the service is overloaded (MAX_QUEUE), and systemd's
WATCHDOG=1 only while the loop is healthy and, once the service has served, workers make progress.

Nothing here touches a real process, socket or clock: processes come from a `ProcessOps`, time
from a `clock`, randomness from an `rng`, so tests run the loop deterministically with fakes
(supervisor/processes.py holds the real ones).
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from api.config import ConfigError, Settings
from api.protocol import (
    CLEAN_EXITS,
    EXIT_DRAINED,
    EXIT_MODEL_LOAD_FAILED,
    Command,
    Sentinel,
    WorkerState,
    describe_exit,
    describe_failure_for_clients,
)
from supervisor.policy import Backoff, restart_after_with_jitter

log = logging.getLogger("supervisor")

MB = 1024 * 1024


# -- what the arbiter needs from the outside world


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: int
    restart_after: int  # inference requests before the worker exits (0: no limit)


class ChildProcess(Protocol):
    """One spawned worker process, as the arbiter sees it."""

    pid: int

    def poll(self) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal), else None."""

    def send(self, line: str) -> None:
        """Write a command line to the worker's stdin (ignored if the worker is gone)."""

    def terminate(self) -> None:
        """Ask the process and its descendants to end (SIGTERM; a stopped process is continued)."""

    def kill(self) -> None:
        """Kill the process and all its descendants at once."""

    def read_sentinel(self) -> Sentinel | None: ...

    def memory_uss(self) -> int | None:
        """Bytes of memory only this process uses (USS), or None if it cannot be measured."""

    def probe(self, port: int, timeout: float) -> Future[bool]:
        """Start a health probe on the worker's control port; the future tells if it answered."""

    def close(self) -> None:
        """Release what the supervisor holds for the exited process (pipes, sentinel file)."""


class ProcessOps(Protocol):
    def spawn(self, spec: WorkerSpec) -> ChildProcess: ...

    def close_listener(self) -> None:
        """Close the supervisor's copy of the public socket (on stop)."""


class Fallback(Protocol):
    """Answers clients with a 503 while no worker can, or while overloaded (see supervisor/fallback.py)."""

    def enable(self, reason: str, retry_after: int, code: str | None = None) -> None: ...

    def disable(self) -> None: ...


class NullFallback:
    def enable(self, reason: str, retry_after: int, code: str | None = None) -> None:
        pass

    def disable(self) -> None:
        pass


class Line(Protocol):
    """The line of requests waiting for an inference slot (see api/slot_queue.py)."""

    def waiting(self) -> int: ...

    def retry_after(self, waiting: int, slots: int | None = None) -> int: ...


class NoLine:
    def waiting(self) -> int:
        return 0

    def retry_after(self, waiting: int, slots: int | None = None) -> int:
        return 1


class Meters(Protocol):
    """Where the pool's metrics go (api/metrics.py's SupervisorMeters)."""

    def worker_started(self, seconds: float) -> None: ...

    def worker_exited(self, pid: int, reason: str) -> None: ...

    def pool(self, states: dict[str, int], generating: int, waiting: int, largest_uss: int | None) -> None: ...


class NoMeters:
    def worker_started(self, seconds: float) -> None:
        pass

    def worker_exited(self, pid: int, reason: str) -> None:
        pass

    def pool(self, states: dict[str, int], generating: int, waiting: int, largest_uss: int | None) -> None:
        pass


class Gate(Protocol):
    """What a worker passes before it first accepts (see api/accept_gate.py): closed, it keeps
    every worker that is not accepting yet from starting to."""

    def close(self) -> bool:
        """Close it unless a worker holds it open (is accepting or will again); True if closed now."""

    def open(self) -> None: ...


class NoGate:
    """A gate that never closes: the fallback then answers only while no worker could accept."""

    def close(self) -> bool:
        return False

    def open(self) -> None:
        pass


# -- one worker


class Phase(enum.Enum):
    """The supervisor's view of one worker (the worker's own view is its sentinel's state)."""

    STARTING = "starting"  # spawned; loading its model
    READY = "ready"  # accepting connections
    BUSY = "busy"  # running an inference; will accept again
    DRAINING = "draining"  # answering what it has, then exits (asked to, or decided itself)
    TERMINATING = "terminating"  # hung: sent TERM; KILL follows after KILL_TIMEOUT
    KILLED = "killed"  # sent KILL to its whole process tree
    EXITED = "exited"  # reaped


# Every allowed change of phase, in one place. A sentinel that disagrees with a later phase (a
# worker still saying READY after we told it to drain) is ignored, never obeyed backwards.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.READY, Phase.BUSY, Phase.DRAINING, Phase.TERMINATING, Phase.KILLED, Phase.EXITED}),
    Phase.READY: frozenset({Phase.BUSY, Phase.DRAINING, Phase.TERMINATING, Phase.KILLED, Phase.EXITED}),
    Phase.BUSY: frozenset({Phase.READY, Phase.DRAINING, Phase.TERMINATING, Phase.KILLED, Phase.EXITED}),
    Phase.DRAINING: frozenset({Phase.TERMINATING, Phase.KILLED, Phase.EXITED}),
    Phase.TERMINATING: frozenset({Phase.KILLED, Phase.EXITED}),
    Phase.KILLED: frozenset({Phase.EXITED}),
    Phase.EXITED: frozenset(),
}

SENTINEL_PHASES = {WorkerState.READY: Phase.READY, WorkerState.BUSY: Phase.BUSY, WorkerState.DRAINING: Phase.DRAINING}
MAY_ACCEPT = frozenset({Phase.STARTING, Phase.READY, Phase.BUSY})  # may be accepting now or soon
UP = frozenset({Phase.READY, Phase.BUSY})  # loaded and serving: accepting, or will accept again
LEAVING = frozenset({Phase.DRAINING, Phase.TERMINATING, Phase.KILLED, Phase.EXITED})


@dataclass
class WorkerHandle:
    """What the supervisor knows about one child process."""

    worker_id: int
    child: ChildProcess
    generation: int  # configuration generation it was started with (SIGHUP starts a new one)
    spawned_at: float
    phase: Phase = Phase.STARTING
    phase_since: float = 0.0
    sentinel: Sentinel | None = None
    progress_seen_at: float = 0.0  # our clock, when the sentinel last showed progress
    busy_since: float | None = None  # our clock, when the running generation was first seen
    probe: Future[bool] | None = None
    probe_started_at: float = 0.0
    next_probe_at: float = 0.0
    probe_failures: int = 0
    hang_cause: str = ""  # why we sent TERM/KILL
    terminated_at: float = 0.0
    stop_requested: bool = False
    memory_checked_served: int = 0
    next_memory_check_at: float = 0.0
    retire_cause: str = ""  # why we drained it, for the exit metric: "bloated" or "reload"
    uss: int | None = None  # its own memory, last measured

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def name(self) -> str:
        return f"worker {self.worker_id} (pid {self.pid})"

    @property
    def leaving(self) -> bool:
        return self.phase in LEAVING

    @property
    def served(self) -> int:
        return self.sentinel.requests_served if self.sentinel else 0

    @property
    def generating(self) -> bool:
        return bool(self.sentinel and self.sentinel.generating)

    def transition(self, phase: Phase, now: float) -> bool:
        """Move to `phase` if the table allows it; True if the phase changed."""
        if phase is self.phase or phase not in TRANSITIONS[self.phase]:
            return False
        log.debug("%s: %s -> %s", self.name, self.phase.value, phase.value)
        self.phase = phase
        self.phase_since = now
        return True

    def doing(self) -> str:
        """What the worker was doing, for sentences about it."""
        if self.phase is Phase.STARTING:
            return "while loading its model"
        if self.generating:
            return "in the middle of a generation"
        if self.phase is Phase.READY:
            return "while idle"
        return f"while {self.phase.value}"

    def last_words(self) -> str:
        return f"Its last sentinel: {self.sentinel.summary()}." if self.sentinel else "It never wrote its sentinel."


# -- the pool


@dataclass
class Timing:
    """Supervisor-only margins (the configurable limits live in Settings)."""

    tick: float = 0.25  # longest sleep between loop passes when nothing wakes the loop
    hang_margin: float = 1.0  # a worker's own limits fire first; ours this much later
    probe_failures_for_hang: int = 3
    probe_timeout_max: float = 5.0
    probe_timeout_min: float = 1.0
    watchdog_interval: float = 1.0  # WATCHDOG=1 pings (half of systemd's WatchdogSec if set)
    # "A short wait": while no worker is up, clients wait in the accept queue for a loading worker
    # expected READY (going by the last load's time) within this long and late by no more than
    # this; otherwise they get a 503 with Retry-After. A few seconds is a pause any client sits
    # through, and it must exceed how much a load varies: on 2 cores loaded 6-fold, a tiny model's
    # worker took 0.4 to 1.8 s from spawn to READY (a spawned one 2.5 to 6.8 s, imports included).
    short_wait: float = 5.0


@dataclass
class Arbiter:
    settings: Settings
    ops: ProcessOps
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    notify: Callable[[str], None] = lambda _message: None
    fallback: Fallback = field(default_factory=NullFallback)
    gate: Gate = field(default_factory=NoGate)
    reload_settings: Callable[[], Settings] | None = None
    timing: Timing = field(default_factory=Timing)
    line: Line = field(default_factory=NoLine)
    loop_problem: Callable[[], str] = lambda: ""  # what is wrong with the loop's own threads, '' if nothing
    meters: Meters = field(default_factory=NoMeters)

    def __post_init__(self) -> None:
        self.workers: dict[int, WorkerHandle] = {}
        self.signals: collections.deque[str] = collections.deque()  # names ("SIGTERM"), queued by handlers
        self.backoff = Backoff(maximum=self.settings.restart_backoff_max, rng=self.rng)
        self.next_spawn_at = 0.0
        self.last_failure = ""  # the story of the last failure, for the log
        self.failure_for_clients = ""  # the same without pid, exit code or path, for the 503 fallback
        self.next_worker_id = 1
        self.generation = 1
        self.reloading = False
        self.stopping_since: float | None = None
        self.ready_notified = False
        self.unavailable_since: float | None = None  # since when the 503 fallback answers
        self.last_boot_seconds: float | None = None  # spawn to READY, of the last worker that loaded
        self.last_served_at: float | None = None  # when a worker was last seen to have served a request
        self.next_watchdog_at = 0.0
        self.overloaded_since: float | None = None  # since when the fallback refuses newcomers (MAX_QUEUE)
        self.none_up_since: float | None = None  # since when no worker is up (for the watchdog)
        self.watchdog_withheld = ""  # why WATCHDOG=1 is not being sent, '' while it is
        self.next_memory_sample_at = 0.0

    # -- the loop

    def tick(self) -> bool:
        """One pass of the supervisor loop; False once it has stopped and every worker is gone."""
        self.handle_signals()
        self.reap_workers()
        self.read_sentinels()
        self.probe_workers()
        self.murder_workers()
        self.recycle_bloated_workers()
        self.retire_stale_workers()
        self.manage_workers()
        self.update_fallback()
        self.notify_service_manager()
        self.publish_metrics()
        return not (self.stopping and not self.workers)

    @property
    def stopping(self) -> bool:
        return self.stopping_since is not None

    def alive(self) -> list[WorkerHandle]:
        """Every worker not reaped yet (reaping removes a worker from the pool)."""
        return list(self.workers.values())

    def in_phase(self, *phases: Phase) -> list[WorkerHandle]:
        return [handle for handle in self.workers.values() if handle.phase in phases]

    # -- signals: handlers only queue them; the loop acts here

    def handle_signals(self) -> None:
        while self.signals:
            name = self.signals.popleft()
            handler = getattr(self, f"handle_{name.removeprefix('SIG').lower()}", None)
            if handler is None:
                log.warning("ignoring %s", name)
            else:
                handler()

    def handle_term(self) -> None:
        self.begin_stop("SIGTERM")

    def handle_int(self) -> None:
        self.begin_stop("SIGINT (Ctrl+C)")

    def handle_break(self) -> None:  # Windows: CTRL_BREAK_EVENT, what a service manager sends
        self.begin_stop("CTRL_BREAK")

    def handle_hup(self) -> None:
        self.reload("SIGHUP")

    def begin_stop(self, why: str) -> None:
        now = self.clock()
        if self.stopping:
            log.warning("%s again while stopping: killing every worker now", why)
            for handle in self.alive():
                self.kill(handle, "the supervisor was told twice to stop", now)
            return
        self.stopping_since = now
        log.info("%s: stopping. No new connections are accepted; requests in flight have GRACEFUL_TIMEOUT "
                 "(%g s) to finish, then their workers are killed.", why, self.settings.graceful_timeout)
        self.notify("STOPPING=1")
        self.fallback.disable()
        self.gate.open()
        self.ops.close_listener()
        for handle in self.alive():
            if handle.phase not in (Phase.TERMINATING, Phase.KILLED):
                handle.stop_requested = True
                handle.child.send(Command.STOP.value)
                handle.transition(Phase.DRAINING, now)

    def reload(self, why: str) -> None:
        """Rolling restart: re-read the configuration, then replace the workers one by one."""
        if self.stopping:
            return
        if self.reload_settings is not None:
            try:
                new = self.reload_settings()
            except ConfigError as error:
                log.error("%s: the configuration was not reloaded, the running one stays: %s", why, error)
                return
            if (new.listen_ip, new.listen_port) != (self.settings.listen_ip, self.settings.listen_port):
                log.warning("LISTEN_IP/LISTEN_PORT changed; the listening socket stays %s:%d until the service restarts",
                            self.settings.listen_ip, self.settings.listen_port)
            self.settings = new
            self.backoff.maximum = new.restart_backoff_max
        self.generation += 1
        self.reloading = True
        self.backoff.reset()
        self.next_spawn_at = 0.0
        self.notify("RELOADING=1")
        log.info("%s: configuration reloaded; replacing the workers one by one (generation %d)", why, self.generation)

    # -- reap

    def reap_workers(self) -> None:
        now = self.clock()
        for handle in list(self.workers.values()):
            code = handle.child.poll()
            if code is None:
                continue
            last_words = handle.child.read_sentinel()
            if last_words is not None and last_words.requests_served > handle.served:
                self.last_served_at = now  # it served and exited between two of our reads: it still served
            handle.sentinel = last_words or handle.sentinel
            self.account_exit(handle, code, now)
            self.meters.worker_exited(handle.pid, self.exit_reason(handle, code))
            handle.transition(Phase.EXITED, now)
            handle.child.close()
            del self.workers[handle.worker_id]

    def account_exit(self, handle: WorkerHandle, code: int, now: float) -> None:
        """Log how a worker ended and decide whether it counts as a failure."""
        how = describe_exit(code)
        if handle.hang_cause:
            self.record_failure(handle, f"{handle.name} was stopped because {handle.hang_cause}; it is gone ({how})", now,
                                for_clients=f"a worker was stopped because {handle.hang_cause}")
        elif handle.stop_requested or self.stopping:
            log.info("%s stopped (%s) after serving %d request(s)", handle.name, how, handle.served)
        elif code in CLEAN_EXITS:
            reason = handle.sentinel.reason if handle.sentinel and handle.sentinel.reason else how
            log.info("%s exited after serving %d request(s): %s", handle.name, handle.served, reason)
            if handle.served:  # it answered with success: the model works
                self.backoff.reset()
        else:
            detail = f": {handle.sentinel.reason}" if handle.sentinel and handle.sentinel.reason else ""
            self.record_failure(handle, f"{handle.name} {how} {handle.doing()}{detail}", now,
                                for_clients=describe_failure_for_clients(code, handle.doing()))

    def exit_reason(self, handle: WorkerHandle, code: int) -> str:
        """How a worker ended, in one word of api/metrics.py's EXIT_REASONS."""
        if handle.hang_cause:
            return "hung"
        if code == EXIT_MODEL_LOAD_FAILED:
            return "load_failed"
        if handle.stop_requested or self.stopping:
            return "stopped"
        if handle.retire_cause and code in CLEAN_EXITS:
            return handle.retire_cause
        if code == EXIT_DRAINED:  # it recycled itself (a request failed or overran): it did not crash
            return "recycled"
        if code in CLEAN_EXITS:
            return "served"
        return "crashed"

    def record_failure(self, handle: WorkerHandle, story: str, now: float, *, for_clients: str = "a worker failed") -> None:
        """`story` goes to the log; `for_clients`, the same without pid, exit code or path, to the 503."""
        if self.stopping:
            log.warning("%s. %s", story, handle.last_words())
            return
        delay = self.backoff.record_failure()
        self.next_spawn_at = now + delay
        self.last_failure = story
        self.failure_for_clients = for_clients
        if delay:
            plan = f"That makes {self.backoff.failures} failures in a row: the next worker starts in {delay:.1f} s (backoff)."
        else:
            plan = "A replacement starts now."
        log.error("%s. %s %s", story, handle.last_words(), plan)

    # -- watch

    def read_sentinels(self) -> None:
        now = self.clock()
        for handle in self.alive():
            sentinel = handle.child.read_sentinel()
            if sentinel is not None and sentinel != handle.sentinel:
                self.observe(handle, sentinel, now)

    def observe(self, handle: WorkerHandle, sentinel: Sentinel, now: float) -> None:
        """Take in a changed sentinel: progress heartbeat, generation timing, phase."""
        previous = handle.sentinel
        handle.sentinel = sentinel
        if previous is None or (sentinel.progress, sentinel.generating, sentinel.state) != (
                previous.progress, previous.generating, previous.state):
            handle.progress_seen_at = now
        if not sentinel.generating:
            handle.busy_since = None
        elif handle.busy_since is None or previous is None or sentinel.inferences != previous.inferences:
            handle.busy_since = now  # REQUEST_TIMEOUT applies to each inference, not to a request of several
        if previous is not None and sentinel.requests_served > previous.requests_served:
            self.backoff.reset()  # the model works: failures so far were not a pattern
            self.last_served_at = now
        phase = SENTINEL_PHASES.get(sentinel.state)
        was_loading = handle.phase is Phase.STARTING
        if phase is None or not handle.transition(phase, now):
            return
        if was_loading:
            self.last_boot_seconds = now - handle.spawned_at
            self.meters.worker_started(self.last_boot_seconds)
        if phase is Phase.READY and not self.ready_notified:
            log.info("%s is ready after %.2f s: serving on http://%s:%d", handle.name, now - handle.spawned_at,
                     self.settings.listen_ip, self.settings.listen_port)
        elif phase is Phase.READY and previous is not None and previous.state is WorkerState.BOOTING:
            log.debug("%s is ready after %.2f s", handle.name, now - handle.spawned_at)
        elif phase is Phase.DRAINING and sentinel.reason:
            log.debug("%s is draining: %s", handle.name, sentinel.reason)

    def probe_workers(self) -> None:
        """Health probes on each worker's control port; a run of failures counts as a hang.

        A worker opens its control port before it loads its model and announces it in its first
        sentinel, so a worker frozen while loading is found as fast as an idle one, not after
        BOOT_TIMEOUT. (The load does not starve the thread that answers: gpt4all loads in C through
        ctypes, which releases the GIL; measured on 2 busy cores, that thread never waited more than
        18 ms during a 0.2 s load of the bundled model.)"""
        now = self.clock()
        interval = self.settings.health_interval
        timeout = min(self.timing.probe_timeout_max, max(self.timing.probe_timeout_min, interval))
        for handle in self.in_phase(Phase.STARTING, Phase.READY, Phase.BUSY, Phase.DRAINING):
            if handle.probe is not None:
                if handle.probe.done():
                    answered = not handle.probe.cancelled() and handle.probe.exception() is None and handle.probe.result()
                    handle.probe = None
                    handle.probe_failures = 0 if answered else handle.probe_failures + 1
                elif now - handle.probe_started_at > timeout + self.timing.tick:
                    handle.probe = None
                    handle.probe_failures += 1
                if handle.probe_failures:
                    log.debug("%s: %d health probe(s) failed in a row", handle.name, handle.probe_failures)
            elif now >= handle.next_probe_at and handle.sentinel and handle.sentinel.control_port:
                handle.probe = handle.child.probe(handle.sentinel.control_port, timeout)
                handle.probe_started_at = now
                handle.next_probe_at = now + interval

    # -- act

    def hang_cause(self, handle: WorkerHandle, now: float) -> str:
        """Why `handle` counts as hung, in words, or '' if it does not."""
        settings, margin = self.settings, self.timing.hang_margin
        if handle.phase is Phase.STARTING and now - handle.spawned_at > settings.boot_timeout:
            return (f"it was still loading its model after {now - handle.spawned_at:.1f} s "
                    f"(BOOT_TIMEOUT is {settings.boot_timeout:g} s)")
        if handle.generating and now - handle.progress_seen_at > settings.stall_timeout + margin:
            return (f"its generation made no progress for {now - handle.progress_seen_at:.1f} s "
                    f"(STALL_TIMEOUT is {settings.stall_timeout:g} s) and the worker did not stop it itself")
        if handle.generating and handle.busy_since is not None and now - handle.busy_since > settings.request_timeout + margin:
            return (f"its generation ran for {now - handle.busy_since:.1f} s "
                    f"(REQUEST_TIMEOUT is {settings.request_timeout:g} s) and the worker did not stop it itself")
        if handle.probe_failures >= self.timing.probe_failures_for_hang:
            return f"it did not answer {handle.probe_failures} health probes in a row {handle.doing()}"
        # A draining worker may still owe answers to connections it accepted before it stopped
        # accepting; each one shows as progress. Only a drain that shows nothing for
        # GRACEFUL_TIMEOUT is stuck: killing a worker that is still answering loses those requests.
        quiet_since = max(handle.phase_since, handle.progress_seen_at)
        if (handle.phase is Phase.DRAINING and not handle.generating and not self.stopping
                and now - quiet_since > settings.graceful_timeout + margin):
            return (f"it was still finishing its last response after {now - quiet_since:.1f} s without progress "
                    f"(GRACEFUL_TIMEOUT is {settings.graceful_timeout:g} s)")
        return ""

    def murder_workers(self) -> None:
        """TERM the hung, KILL those that ignored TERM, and kill everyone when a graceful stop is over."""
        now = self.clock()
        for handle in self.alive():
            if handle.phase is Phase.KILLED:
                continue
            if handle.phase is Phase.TERMINATING:
                if now - handle.terminated_at >= self.settings.kill_timeout:
                    self.kill(handle, f"it was still there {self.settings.kill_timeout:g} s after TERM", now)
                continue
            if self.stopping and now - (self.stopping_since or now) >= self.settings.graceful_timeout:
                self.kill(handle, f"GRACEFUL_TIMEOUT ({self.settings.graceful_timeout:g} s) is over", now)
                continue
            cause = self.hang_cause(handle, now)
            if cause:
                self.terminate(handle, cause, now)

    def terminate(self, handle: WorkerHandle, cause: str, now: float) -> None:
        log.warning("%s seems hung: %s. %s Stopping it: TERM now, and KILL of its process tree in %g s "
                    "if it is still there.", handle.name, cause, handle.last_words(), self.settings.kill_timeout)
        handle.hang_cause = cause
        handle.terminated_at = now
        handle.transition(Phase.TERMINATING, now)
        handle.child.terminate()

    def kill(self, handle: WorkerHandle, why: str, now: float) -> None:
        log.warning("Killing %s and its process tree: %s.", handle.name, why)
        if not handle.hang_cause and not self.stopping:
            handle.hang_cause = why
        handle.transition(Phase.KILLED, now)
        handle.child.kill()

    def drain(self, handle: WorkerHandle, reason: str, now: float, cause: str = "reload") -> None:
        handle.retire_cause = cause
        handle.child.send(f"{Command.DRAIN.value} {reason}")
        handle.transition(Phase.DRAINING, now)

    def recycle_bloated_workers(self) -> None:
        """A worker whose own memory (USS) grew past the limit is replaced after its request.
        Checked while it works and after each request it served, never before its first one."""
        limit_mb = self.settings.max_worker_memory_mb
        if not limit_mb or self.stopping:
            return
        now = self.clock()
        for handle in self.in_phase(Phase.READY, Phase.BUSY):
            served_more = handle.served > handle.memory_checked_served
            if not served_more and not (handle.phase is Phase.BUSY and now >= handle.next_memory_check_at):
                continue
            handle.memory_checked_served = handle.served
            handle.next_memory_check_at = now + self.settings.health_interval
            uss = handle.uss = handle.child.memory_uss()
            if uss is not None and uss > limit_mb * MB:
                log.warning("%s uses %.1f MB of its own memory (USS), above MAX_WORKER_MEMORY_MB (%d): it will be "
                            "replaced after its current request.", handle.name, uss / MB, limit_mb)
                self.drain(handle, f"its memory (USS {uss / MB:.1f} MB) is above MAX_WORKER_MEMORY_MB ({limit_mb})", now,
                           cause="bloated")

    def retire_stale_workers(self) -> None:
        """After a reload, drain one old worker for each new one that is up, so capacity never drops.

        Only workers that are up count as capacity. An old worker still loading (started by an
        earlier reload that a newer one overtook) serves no one: it goes at once, and never in
        place of a worker that is up."""
        if self.stopping:
            return
        now = self.clock()
        old = [h for h in self.alive() if h.generation < self.generation]
        for handle in [h for h in old if h.phase is Phase.STARTING]:
            log.info("%s was still loading an old configuration: draining it (reload)", handle.name)
            self.drain(handle, "the configuration was reloaded", now)
        staying = [h for h in old if not h.leaving]
        if not staying:
            if self.reloading and not old and any(h.phase is Phase.READY for h in self.alive()):
                self.reloading = False
                log.info("reload complete: every worker runs the new configuration")
                self.notify("READY=1")
            return
        new_up = sum(1 for h in self.alive() if h.generation == self.generation and h.phase in UP)
        if new_up + len(staying) - 1 >= self.settings.workers + self.settings.warm_spares:
            victim = min(staying, key=lambda h: (h.phase is not Phase.READY, h.worker_id))
            log.info("%s runs the old configuration: draining it (reload)", victim.name)
            self.drain(victim, "the configuration was reloaded", now)

    def target_size(self) -> int:
        """Workers that are not leaving: WORKERS + WARM_SPARES, and one more during a rolling restart."""
        surge = any(h.generation < self.generation and not h.leaving for h in self.alive())
        return self.settings.workers + self.settings.warm_spares + (1 if surge else 0)

    def manage_workers(self) -> None:
        """Start the workers that are missing, at once, except while failures call for a backoff."""
        if self.stopping:
            return
        now = self.clock()
        staying = [h for h in self.alive() if not h.leaving]
        missing = self.target_size() - len(staying)
        if missing <= 0:
            return
        if self.backoff.failures:
            if now < self.next_spawn_at or any(h.phase is Phase.STARTING for h in staying):
                return
            missing = 1  # while failing, one trial at a time
        for _ in range(missing):
            self.spawn_worker(now)

    def spawn_worker(self, now: float) -> WorkerHandle | None:
        self.fallback.disable()  # from now on a worker may accept: the fallback must not
        spec = WorkerSpec(self.next_worker_id, restart_after_with_jitter(
            self.settings.restart_after_requests, self.settings.restart_jitter, self.rng))
        self.next_worker_id += 1
        try:
            child = self.ops.spawn(spec)
        except OSError as error:
            delay = self.backoff.record_failure()
            self.next_spawn_at = now + max(delay, self.timing.tick)
            self.last_failure = f"a worker process could not be started: {error}"
            self.failure_for_clients = "a worker process could not be started"
            log.error("%s; retrying in %.1f s", self.last_failure, self.next_spawn_at - now)
            return None
        handle = WorkerHandle(spec.worker_id, child, self.generation, spawned_at=now, phase_since=now,
                              progress_seen_at=now)
        self.workers[spec.worker_id] = handle
        log.debug("%s started (restart after %s request(s))", handle.name, spec.restart_after or "no limit of")
        return handle

    # -- tell the world

    def unavailable_reason(self, retry_after: int) -> str:
        """What clients read (whoever they are): what is wrong, without the log's pids and paths."""
        return (f"No worker can serve requests right now: {self.failure_for_clients}. "
                f"{self.backoff.failures} attempt(s) failed in a row; the next one starts in about {retry_after} s. "
                "The service log has the details.")

    def expected_ready_at(self, handle: WorkerHandle) -> float:
        """When a loading worker should be READY, going by the last load (none measured yet: at once)."""
        return handle.spawned_at + (self.last_boot_seconds or 0.0)

    def ready_soon(self, handle: WorkerHandle, now: float) -> bool:
        """Whether clients had better wait for this loading worker than get a 503: it is due within
        a short wait, and not late by more than that either (a frozen or stuck load)."""
        due, wait = self.expected_ready_at(handle), self.timing.short_wait
        return due - wait <= now <= due + wait

    def still_loading(self, loading: list[WorkerHandle], now: float) -> tuple[str, int]:
        """The 503's reason and Retry-After while workers load but none will be READY soon."""
        upcoming = [due for due in map(self.expected_ready_at, loading) if due > now]
        if upcoming:  # a model that takes long to load: say when, going by the last load
            retry_after = math.ceil(min(upcoming) - now)
            return f"No worker is ready yet: the model is loading and should be ready in about {retry_after} s.", retry_after
        loading_for = now - min(handle.spawned_at for handle in loading)
        slower = "" if self.last_boot_seconds is None else f", longer than the last load ({self.last_boot_seconds:.1f} s)"
        return (f"No worker is ready yet: the model has been loading for {loading_for:.0f} s{slower}.",
                max(1, math.ceil(self.timing.short_wait)))

    def why_unavailable(self, now: float) -> tuple[str, int] | None:
        """Why clients should get a 503 now, and when to retry; None while a worker is up or will
        be within a short wait (clients wait in the accept queue for it instead)."""
        if self.in_phase(*UP):
            return None
        loading = self.in_phase(Phase.STARTING)
        if any(self.ready_soon(handle, now) for handle in loading):
            return None
        if loading:
            return self.still_loading(loading, now)
        if self.backoff.failures:
            retry_after = max(1, math.ceil(self.next_spawn_at - now))
            return self.unavailable_reason(retry_after), retry_after
        return None

    def workers_kept_out(self) -> bool:
        """True if no worker can accept while the fallback does: none that could exists, or the
        accept gate is closed (it closes only while no worker is accepting or will again)."""
        return not self.in_phase(*MAY_ACCEPT) or self.gate.close()

    def note_the_service_is_back(self, now: float) -> None:
        # (a worker may come up and serve its request between two passes: only the served request shows)
        if self.unavailable_since is None:
            return
        served = self.last_served_at is not None and self.last_served_at >= self.unavailable_since
        if self.in_phase(*UP) or served:
            log.info("a worker is up again: the service is back after %.1f s of 503 answers",
                     now - self.unavailable_since)
            self.unavailable_since = None

    def update_fallback(self) -> None:
        """Answer clients with a 503 that says why while no worker is up and none will be within a
        short wait: during a crash backoff, and while workers load for longer than that. Never
        while a worker may accept: the fallback and a worker never accept on the socket at once.
        And refuse newcomers at once while the service is overloaded (see why_overloaded)."""
        now = self.clock()
        self.note_the_service_is_back(now)
        unavailable = None if self.stopping else self.why_unavailable(now)
        if unavailable is not None and self.workers_kept_out():
            reason, retry_after = unavailable
            if self.unavailable_since is None:
                self.unavailable_since = now
                log.warning("no worker can serve: clients get 503 with Retry-After until one is ready. %s", reason)
            self.fallback.enable(reason, retry_after)
            return
        overloaded = None if unavailable is not None else self.why_overloaded(now)
        self.note_overload(overloaded, now)
        if overloaded is None:
            self.fallback.disable()  # returns once the fallback accepts no more ...
        else:
            self.fallback.enable(*overloaded, code="queue_full")
        self.gate.open()  # ... and only then may a worker that waits at the gate accept

    def why_overloaded(self, now: float) -> tuple[str, int] | None:
        """With MAX_QUEUE set: why a newcomer should get a 503 at once, and when to retry; None
        while a worker can take it. Workers are up, but each one is generating or holds a client
        waiting for a slot (a worker holds one), and either the line is full or no worker is about
        to finish loading. Left alone, newcomers would wait in the kernel's accept queue, where no
        limit and no timeout reach them."""
        limit = self.settings.max_queue
        if limit is None or self.stopping or not self.in_phase(*UP):
            return None
        waiting = self.line.waiting()
        if len(self.in_phase(Phase.READY)) > waiting:
            return None  # a worker is free: it takes the client, and queues or refuses it itself
        line_full = waiting >= limit
        if not line_full and any(self.ready_soon(handle, now) for handle in self.in_phase(Phase.STARTING)):
            return None  # a worker is about to be free: clients wait for it in the accept queue
        retry_after = self.line.retry_after(waiting, self.settings.workers)
        why = (f"{waiting} request(s) wait for one (MAX_QUEUE is {limit})" if line_full else
               f"every worker is busy or holds a waiting request ({waiting} wait; MAX_QUEUE is {limit})")
        return f"The server is at capacity: every inference slot is busy and {why}. Try again in about {retry_after} s.", retry_after

    def note_overload(self, overloaded: tuple[str, int] | None, now: float) -> None:
        if overloaded is not None and self.overloaded_since is None:
            self.overloaded_since = now
            log.warning("overloaded: newcomers get 503 with Retry-After at once. %s", overloaded[0])
        elif overloaded is None and self.overloaded_since is not None:
            log.info("no longer overloaded after %.1f s: workers take clients again", now - self.overloaded_since)
            self.overloaded_since = None

    def notify_service_manager(self) -> None:
        now = self.clock()
        if not self.ready_notified and self.in_phase(Phase.READY):
            self.ready_notified = True
            self.notify("READY=1\nSTATUS=serving")
        if now < self.next_watchdog_at:
            return
        self.next_watchdog_at = now + self.timing.watchdog_interval
        problem = self.why_unhealthy(now)
        if problem:
            if problem != self.watchdog_withheld:
                log.error("withholding systemd's WATCHDOG=1 (systemd restarts the service when its WatchdogSec runs "
                          "out): %s", problem)
            self.watchdog_withheld = problem
            self.notify(f"STATUS=unhealthy: {problem}")
            return
        if self.watchdog_withheld:
            log.info("healthy again: WATCHDOG=1 resumes")
            self.watchdog_withheld = ""
        ready, busy = len(self.in_phase(Phase.READY)), len(self.in_phase(Phase.BUSY, Phase.DRAINING))
        self.notify(f"WATCHDOG=1\nSTATUS={ready} worker(s) ready, {busy} busy")

    def progress_limit(self) -> float:
        """How long a generation may show no progress before the loop's own remedy (TERM, then KILL,
        then a replacement) must have worked."""
        return self.settings.stall_timeout + self.timing.hang_margin + self.settings.kill_timeout + 4 * self.timing.tick

    def down_limit(self) -> float:
        """How long no worker may be up, after the service has served, before it counts as stuck:
        a load (BOOT_TIMEOUT), the longest backoff and a kill."""
        return self.settings.boot_timeout + self.settings.restart_backoff_max + self.settings.kill_timeout

    def why_unhealthy(self, now: float) -> str:
        """Why WATCHDOG=1 should not be sent ('' if it should): a thread the loop relies on died,
        or, once the service has served a request, workers stopped making progress: a generation
        showed none for longer than the remedy takes, or no worker has been up for longer than a
        load and a backoff take. Before the first request is served nothing is expected (a model
        that never loads is answered with 503s, and a restart by systemd would not mend it)."""
        if self.stopping:
            return ""
        problem = self.loop_problem()
        if problem or self.last_served_at is None:
            return problem
        generating = [handle for handle in self.alive() if handle.generating and handle.phase is not Phase.EXITED]
        if generating:
            quiet = now - max(handle.progress_seen_at for handle in generating)
            if quiet > self.progress_limit():
                return f"no generation made progress for {quiet:.1f} s, and stopping the workers did not help"
        if self.in_phase(*UP):
            self.none_up_since = None
            return ""
        if self.none_up_since is None:
            self.none_up_since = now
        down = now - self.none_up_since
        if down > self.down_limit():
            return f"no worker has been up for {down:.1f} s ({self.failure_for_clients or 'workers keep failing'})"
        return ""

    # -- metrics

    def publish_metrics(self) -> None:
        """Workers by phase, generations running, clients in line and the largest worker's USS
        (measured every HEALTH_INTERVAL) for /metrics."""
        now = self.clock()
        if now >= self.next_memory_sample_at:
            self.next_memory_sample_at = now + self.settings.health_interval
            for handle in self.in_phase(Phase.READY, Phase.BUSY, Phase.DRAINING):
                handle.uss = handle.child.memory_uss()
        states = collections.Counter(handle.phase.value for handle in self.workers.values())
        measured = [handle.uss for handle in self.in_phase(*UP, Phase.DRAINING) if handle.uss is not None]
        self.meters.pool(dict(states), sum(1 for handle in self.alive() if handle.generating), self.line.waiting(),
                         max(measured, default=None))
