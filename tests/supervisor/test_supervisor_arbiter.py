"""The supervisor's decisions, driven deterministically: a fake clock, fake child processes whose
sentinels, exit codes, memory and health the test sets, and no real process or socket."""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest

from api.config import Settings, load_settings
from api.protocol import (
    EXIT_DRAINED,
    EXIT_MODEL_LOAD_FAILED,
    EXIT_SERVED,
    EXIT_STOPPED,
    Sentinel,
    WorkerState,
)
from supervisor.arbiter import Arbiter, Phase, Timing, WorkerSpec
from supervisor.policy import Backoff, restart_after_with_jitter

MB = 1024 * 1024


def make_settings(**overrides: object) -> Settings:
    environ = {"WORKERS": "1", "WARM_SPARES": "1", "RESTART_AFTER_REQUESTS": "1", "STALL_TIMEOUT": "10",
               "REQUEST_TIMEOUT": "60", "BOOT_TIMEOUT": "20", "HEALTH_INTERVAL": "5", "GRACEFUL_TIMEOUT": "30",
               "KILL_TIMEOUT": "5", "RESTART_BACKOFF_MAX": "30"}
    environ.update({key: str(value) for key, value in overrides.items()})
    return load_settings(environ, env_file=Path(os.devnull))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeChild:
    next_pid = 100

    def __init__(self, spec: WorkerSpec) -> None:
        FakeChild.next_pid += 1
        self.pid = FakeChild.next_pid
        self.spec = spec
        self.returncode: int | None = None
        self.sentinel: Sentinel | None = None
        self.sent: list[str] = []
        self.signals: list[str] = []
        self.uss: int | None = 50 * MB
        self.healthy = True
        self.probes = 0
        self.closed = False

    # ChildProcess
    def poll(self) -> int | None:
        return self.returncode

    def send(self, line: str) -> None:
        self.sent.append(line)

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")

    def read_sentinel(self) -> Sentinel | None:
        return self.sentinel

    def memory_uss(self) -> int | None:
        return self.uss

    def probe(self, port: int, timeout: float) -> Future[bool]:
        self.probes += 1
        future: Future[bool] = Future()
        future.set_result(self.healthy)
        return future

    def close(self) -> None:
        self.closed = True

    # what the test does to it
    def report(self, state: WorkerState, **fields: object) -> None:
        base = self.sentinel or Sentinel(worker_id=self.spec.worker_id, pid=self.pid, state=state, control_port=4000)
        self.sentinel = replace(base, state=state, **fields)  # type: ignore[arg-type]

    def become_ready(self) -> None:
        self.report(WorkerState.READY)

    def start_generation(self, drains: bool = True) -> None:
        self.report(WorkerState.DRAINING if drains else WorkerState.BUSY, generating=True,
                    progress=(self.sentinel.progress if self.sentinel else 0) + 1,
                    inferences=(self.sentinel.inferences if self.sentinel else 0) + 1)

    def tick_progress(self) -> None:
        assert self.sentinel is not None
        self.report(self.sentinel.state, progress=self.sentinel.progress + 1)

    def finish(self, code: int = EXIT_SERVED) -> None:
        assert self.sentinel is not None
        self.report(self.sentinel.state, generating=False, requests_served=self.sentinel.requests_served + 1)
        self.returncode = code


class FakeOps:
    def __init__(self) -> None:
        self.children: list[FakeChild] = []
        self.listener_closed = False
        self.fail_spawn = False

    def spawn(self, spec: WorkerSpec) -> FakeChild:
        if self.fail_spawn:
            raise OSError("Resource temporarily unavailable")
        child = FakeChild(spec)
        self.children.append(child)
        return child

    def close_listener(self) -> None:
        self.listener_closed = True

    def alive(self) -> list[FakeChild]:
        return [child for child in self.children if child.returncode is None]


class FakeFallback:
    def __init__(self) -> None:
        self.enabled: tuple[str, int] | None = None
        self.history: list[bool] = []

    def enable(self, reason: str, retry_after: int, code: str | None = None) -> None:
        self.enabled = (reason, retry_after)
        self.code = code
        self.history.append(True)

    def disable(self) -> None:
        self.enabled = None
        self.history.append(False)


class FakeGate:
    """The accept gate: closes unless a worker holds it open; records whether the fallback was
    still answering whenever it opened (it must never be: a worker may accept right after)."""

    def __init__(self, fallback: FakeFallback) -> None:
        self.fallback = fallback
        self.held_open = False  # a worker passed it (accepting, or will again)
        self.closed = False
        self.opened_while_answering: list[bool] = []

    def close(self) -> bool:
        self.closed = self.closed or not self.held_open
        return self.closed

    def open(self) -> None:
        if self.closed:
            self.opened_while_answering.append(self.fallback.enabled is not None)
            self.closed = False


class FakeLine:
    """The line for a slot: as many waiting as the test says; Retry-After 3 s per request."""

    def __init__(self) -> None:
        self.count = 0

    def waiting(self) -> int:
        return self.count

    def retry_after(self, waiting: int, slots: int | None = None) -> int:
        return 3 * (waiting + 1) // (slots or 1)


class FakeMeters:
    def __init__(self) -> None:
        self.exits: list[tuple[int, str]] = []
        self.startups: list[float] = []
        self.pools: list[tuple[dict[str, int], int, int, int | None]] = []

    def worker_started(self, seconds: float) -> None:
        self.startups.append(seconds)

    def worker_exited(self, pid: int, reason: str) -> None:
        self.exits.append((pid, reason))

    def pool(self, states: dict[str, int], generating: int, waiting: int, largest_uss: int | None) -> None:
        self.pools.append((states, generating, waiting, largest_uss))


class Harness:
    def __init__(self, *, with_gate: bool = False, **overrides: object) -> None:
        self.clock = FakeClock()
        self.ops = FakeOps()
        self.fallback = FakeFallback()
        self.gate = FakeGate(self.fallback)
        self.line = FakeLine()
        self.problem = ""
        self.notes: list[str] = []
        self.reloaded: Settings | None = None
        self.meters = FakeMeters()
        gate = {"gate": self.gate} if with_gate else {}
        self.arbiter = Arbiter(make_settings(**overrides), self.ops, clock=self.clock, rng=random.Random(7),
                               notify=self.notes.append, fallback=self.fallback, reload_settings=self.reload,
                               timing=Timing(tick=0.25), line=self.line, loop_problem=lambda: self.problem, meters=self.meters, **gate)

    def reload(self) -> Settings:
        assert self.reloaded is not None
        return self.reloaded

    def tick(self, seconds: float = 0.0) -> bool:
        self.clock.advance(seconds)
        return self.arbiter.tick()

    def run(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(round(seconds / step)):
            self.tick(step)

    def ready_pool(self) -> list[FakeChild]:
        self.tick()
        for child in self.ops.alive():
            child.become_ready()
        self.tick()
        return self.ops.alive()

    def phases(self) -> list[Phase]:
        return [handle.phase for handle in self.arbiter.workers.values()]


# -- policy


def test_backoff_first_failure_is_immediate_then_doubles_with_equal_jitter_up_to_the_maximum() -> None:
    backoff = Backoff(base=0.5, maximum=8.0, rng=random.Random(1))
    delays = [backoff.record_failure() for _ in range(8)]
    assert delays[0] == 0
    nominal = [0, 0.5, 1, 2, 4, 8, 8, 8]
    for delay, expected in zip(delays, nominal, strict=True):
        assert expected / 2 <= delay <= expected
    assert len(set(delays[1:])) > 3, "jitter varies the delays"
    backoff.reset()
    assert backoff.failures == 0 and backoff.record_failure() == 0


def test_restart_after_jitter_stays_in_range_and_zero_means_never() -> None:
    rng = random.Random(3)
    values = {restart_after_with_jitter(5, 3, rng) for _ in range(200)}
    assert values == {5, 6, 7, 8}
    assert restart_after_with_jitter(0, 3, rng) == 0
    assert restart_after_with_jitter(1, 0, rng) == 1


# -- pool size and restarts


def test_starts_workers_plus_spares_and_reports_ready_once() -> None:
    h = Harness(WORKERS=2, WARM_SPARES=1)
    h.tick()
    assert len(h.ops.children) == 3
    assert h.phases() == [Phase.STARTING] * 3
    assert not any(note.startswith("READY=1") for note in h.notes)
    h.ops.children[0].become_ready()
    h.tick()
    assert sum(note.startswith("READY=1") for note in h.notes) == 1
    assert [child.spec.restart_after for child in h.ops.children] == [1, 1, 1]


def test_a_worker_that_starts_its_last_request_is_replaced_at_once_before_it_exits() -> None:
    h = Harness()
    first, _spare = h.ready_pool()
    first.start_generation(drains=True)
    h.tick()
    assert len(h.ops.children) == 3, "the replacement loads while the generation runs"
    assert h.arbiter.workers[first.spec.worker_id].phase is Phase.DRAINING
    first.finish(EXIT_SERVED)
    h.tick()
    assert first.closed and first.spec.worker_id not in h.arbiter.workers
    assert h.arbiter.backoff.failures == 0
    assert len(h.ops.children) == 3, "a served exit needs no further spawn: its replacement exists"


def test_a_draining_worker_still_answering_queued_requests_is_not_killed() -> None:
    """Seen under load: a worker had accepted 4 connections before its first request made it stop
    accepting; it served them one after another, and was killed 30 s into its drain while still
    producing tokens, losing the requests it had not answered yet."""
    h = Harness(GRACEFUL_TIMEOUT=30)
    first, _spare = h.ready_pool()
    for _ in range(4):  # one queued request after another, each 15 s, with a gap between them
        first.start_generation(drains=True)
        for _ in range(15):
            h.tick(1.0)
            first.tick_progress()
        first.report(WorkerState.DRAINING, generating=False, requests_served=first.sentinel.requests_served + 1)
        h.tick(0.5)
    assert first.signals == [], "it was answering requests all along"
    h.run(30 + h.arbiter.timing.hang_margin + 1)  # now it goes quiet without exiting: a stuck drain
    assert first.signals == ["TERM"]


def test_busy_worker_that_will_come_back_is_not_replaced() -> None:
    h = Harness(RESTART_AFTER_REQUESTS=0)
    first, _spare = h.ready_pool()
    assert first.spec.restart_after == 0
    first.start_generation(drains=False)
    h.tick()
    assert h.arbiter.workers[first.spec.worker_id].phase is Phase.BUSY
    assert len(h.ops.children) == 2
    first.report(WorkerState.READY, generating=False, requests_served=1)
    h.tick()
    assert h.arbiter.workers[first.spec.worker_id].phase is Phase.READY


def test_a_sentinel_never_moves_a_worker_backwards() -> None:
    h = Harness()
    first, _ = h.ready_pool()
    handle = h.arbiter.workers[first.spec.worker_id]
    h.arbiter.drain(handle, "test", h.clock())
    first.report(WorkerState.READY, progress=5)
    h.tick()
    assert handle.phase is Phase.DRAINING


def test_a_crash_mid_request_is_replaced_at_once_and_logged_with_its_last_sentinel(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(RESTART_AFTER_REQUESTS=0)
    first, _ = h.ready_pool()
    first.start_generation(drains=False)
    h.tick()
    first.returncode = -signal.SIGKILL
    h.tick()
    assert len(h.ops.alive()) == 2 and len(h.ops.children) == 3
    assert h.arbiter.backoff.failures == 1
    text = caplog.text
    assert f"worker 1 (pid {first.pid}) killed by SIGKILL in the middle of a generation" in text
    assert "Its last sentinel: state BUSY" in text and "A replacement starts now" in text


# -- a worker that keeps dying at start


def fail_booting(h: Harness) -> int:
    for child in h.ops.alive():
        if child.sentinel is None or child.sentinel.state is WorkerState.BOOTING:
            child.report(WorkerState.BOOTING, reason="the model x.gguf could not be loaded: Unsupported file format")
            child.returncode = EXIT_MODEL_LOAD_FAILED
    return len(h.ops.children)


def test_crash_loop_at_start_backs_off_exponentially_one_trial_at_a_time_with_a_503() -> None:
    h = Harness(RESTART_BACKOFF_MAX=8)
    spawn_times: list[float] = []
    h.tick()
    spawn_times += [h.clock()] * len(h.ops.children)
    most_alive = 0
    for _ in range(400):  # 100 s of a broken model, every spawn dying at once
        before = len(h.ops.children)
        fail_booting(h)
        h.tick(0.25)
        spawn_times += [h.clock()] * (len(h.ops.children) - before)
        most_alive = max(most_alive, len(h.ops.alive()))
    gaps = [b - a for a, b in itertools.pairwise(spawn_times)]
    assert most_alive == 1, "one trial at a time"
    assert len(spawn_times) < 25, f"a restart storm: {len(spawn_times)} spawns in 100 s"
    assert max(gaps) <= 8 + 0.5 and max(gaps) >= 4, "the delay grows up to RESTART_BACKOFF_MAX"
    assert gaps[2] < gaps[5], "the delay grows"
    # while waiting, clients get a 503 that says why
    fail_booting(h)
    h.tick()
    assert h.fallback.enabled is not None
    reason, retry_after = h.fallback.enabled
    assert reason.startswith("No worker can serve requests right now: the model could not be loaded.")
    assert 1 <= retry_after <= 9


def test_fallback_is_disabled_before_any_spawn_and_while_any_worker_may_accept() -> None:
    h = Harness(RESTART_BACKOFF_MAX=4)
    h.tick()
    fail_booting(h)
    h.tick()  # both failed: backoff, no worker process left
    assert h.fallback.enabled is not None
    spawned = len(h.ops.children)
    while len(h.ops.children) == spawned:
        h.tick(0.25)
    assert h.fallback.history[-1] is False and h.fallback.enabled is None, "disabled before the new worker could accept"
    # the new trial loads: still no fallback (clients wait in the backlog), then it is ready: recovered
    h.ops.alive()[0].become_ready()
    h.tick()
    assert h.fallback.enabled is None


def boot_once_in(h: Harness, seconds: float) -> FakeChild:
    """Start a pool of one whose worker takes `seconds` to load (the arbiter measures it), then
    have that worker serve its request and go, so that no worker is up and its replacement loads."""
    h.tick()
    [first] = h.ops.alive()
    first.report(WorkerState.BOOTING)
    h.run(seconds)
    first.become_ready()
    h.tick()
    assert h.arbiter.last_boot_seconds == pytest.approx(seconds)
    first.start_generation(drains=True)
    h.tick()
    first.finish(EXIT_SERVED)
    h.tick()
    [replacement] = h.ops.alive()
    replacement.report(WorkerState.BOOTING)
    return replacement


def test_clients_wait_for_a_worker_due_within_a_short_wait_then_get_a_503_with_retry_after(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisor")
    h = Harness(with_gate=True, WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120)
    late = boot_once_in(h, 0.5)
    short_wait = h.arbiter.timing.short_wait
    h.run(0.5 + short_wait - 0.25)  # due after 0.5 s, like the last load: clients wait in the accept queue
    assert h.fallback.enabled is None and not h.gate.closed
    h.run(0.5)  # late by more than the short wait (frozen, or stuck)
    assert h.gate.closed, "the gate keeps the loading worker out while the fallback answers"
    assert h.fallback.enabled == ("No worker is ready yet: the model has been loading for 6 s, longer than the "
                                  "last load (0.5 s).", 5)
    assert "no worker can serve: clients get 503" in caplog.text
    late.become_ready()  # it made it after all: READY, and waiting at the gate
    h.tick()
    assert h.fallback.enabled is None and not h.gate.closed
    assert h.gate.opened_while_answering == [False], "the fallback stopped before the gate let the worker in"
    assert "the service is back after" in caplog.text
    assert late.signals == []


def test_a_model_slow_to_load_gets_a_503_that_says_when_then_clients_wait_for_it() -> None:
    h = Harness(with_gate=True, WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120)
    boot_once_in(h, 20)
    assert h.fallback.enabled == ("No worker is ready yet: the model is loading and should be ready in about 20 s.", 20)
    h.run(20 - h.arbiter.timing.short_wait - 0.5)
    assert h.fallback.enabled is not None and h.fallback.enabled[1] == h.arbiter.timing.short_wait + 1
    h.run(0.5)
    assert h.fallback.enabled is None, "due within the short wait: clients wait for it"
    assert not any(h.gate.opened_while_answering)


def test_a_worker_frozen_while_loading_gets_clients_a_503_until_its_replacement_is_due() -> None:
    h = Harness(with_gate=True, WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120, HEALTH_INTERVAL=4)
    frozen = boot_once_in(h, 0.5)
    frozen_at = h.clock()
    frozen.healthy = False
    h.run(6)
    assert h.fallback.enabled is not None and frozen.signals == []
    while frozen.signals != ["TERM"]:  # three failed probes of 4 s each
        h.tick(0.25)
    assert h.clock() - frozen_at < 15, "found by its probes, long before BOOT_TIMEOUT"
    assert len(h.ops.alive()) == 2, "its replacement loads"
    assert h.fallback.enabled is None, "the replacement is due within the short wait: clients wait for it"
    assert h.gate.opened_while_answering == [False]


def test_no_503_while_a_worker_holds_the_gate_open_nor_without_a_gate_while_one_loads() -> None:
    h = Harness(with_gate=True, WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120)
    boot_once_in(h, 0.5)
    h.gate.held_open = True  # say, the worker that served still finishes its answer
    h.run(10)
    assert h.fallback.enabled is None
    h.gate.held_open = False
    h.tick()
    assert h.fallback.enabled is not None
    without_gate = Harness(WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120)
    boot_once_in(without_gate, 0.5)
    without_gate.run(10)
    assert without_gate.fallback.enabled is None, "a loading worker may accept at any moment"


def test_recovery_resets_the_backoff_after_a_served_request() -> None:
    h = Harness(RESTART_BACKOFF_MAX=4, RESTART_AFTER_REQUESTS=0)
    h.tick()
    for _ in range(3):
        fail_booting(h)
        h.run(5)
    assert h.arbiter.backoff.failures >= 3
    child = h.ops.alive()[0]
    child.become_ready()
    h.tick()
    assert h.arbiter.backoff.failures >= 3, "ready is not enough"
    child.report(WorkerState.READY, requests_served=1)
    h.tick()
    assert h.arbiter.backoff.failures == 0
    assert len(h.ops.alive()) == 2, "back to full size at once"


def test_a_worker_that_answered_only_failures_does_not_reset_the_backoff() -> None:
    """A worker that exits as planned after its one request (restart per request) but answered it
    with a 500 has not shown that the model works: the failures before it still count."""
    h = Harness(RESTART_BACKOFF_MAX=4, RESTART_AFTER_REQUESTS=1)
    h.tick()
    for _ in range(3):
        fail_booting(h)
        h.run(5)
    failures = h.arbiter.backoff.failures
    assert failures >= 3
    child = h.ops.alive()[0]
    child.become_ready()
    h.tick()
    child.report(WorkerState.DRAINING, requests_served=0)  # its request ended with a 500
    child.returncode = EXIT_SERVED
    h.tick()
    assert h.arbiter.backoff.failures == failures


MODEL_GONE = ("the model m.gguf could not be loaded: configuration error: MODEL_NAME='m.gguf' is invalid: "
              "expected a model file in MODEL_PATH (/srv/llm/models); no such file")


def load_fails_with_a_path_in_its_reason(child: FakeChild) -> None:
    child.report(WorkerState.BOOTING, reason=MODEL_GONE)
    child.returncode = EXIT_MODEL_LOAD_FAILED


def crashes_while_loading(child: FakeChild) -> None:
    child.report(WorkerState.BOOTING)
    child.returncode = -signal.SIGABRT


@pytest.mark.parametrize(("fault", "for_clients", "in_the_log"), [
    (load_fails_with_a_path_in_its_reason, "the model could not be loaded", "/srv/llm/models"),
    (crashes_while_loading, "a worker crashed while loading its model", "killed by SIGABRT while loading its model"),
], ids=["model-load-fails", "crash"])
def test_the_503_says_what_is_wrong_without_pids_exit_codes_or_paths_which_stay_in_the_log(
        caplog: pytest.LogCaptureFixture, fault: Callable[[FakeChild], None], for_clients: str, in_the_log: str) -> None:
    caplog.set_level(logging.INFO, logger="supervisor")
    h = Harness(WARM_SPARES=0)
    for _ in range(400):  # every worker meets the fault, until the fallback answers
        for child in h.ops.alive():
            if child.sentinel is None:
                fault(child)
        h.tick(0.25)
        if h.fallback.enabled:
            break
    assert h.fallback.enabled is not None, caplog.text
    reason, _ = h.fallback.enabled
    assert reason.startswith(f"No worker can serve requests right now: {for_clients}"), reason
    assert "The service log has the details." in reason
    pids = [child.pid for child in h.ops.children]
    for secret in ("pid", *map(str, pids), "/srv/llm/models", "code", "SIG"):
        assert secret not in reason
    assert in_the_log in caplog.text and f"(pid {pids[0]})" in caplog.text


def test_spawn_errors_count_as_failures_and_are_retried() -> None:
    h = Harness()
    h.ops.fail_spawn = True
    h.tick()
    assert h.arbiter.backoff.failures >= 1 and "could not be started" in h.arbiter.last_failure
    assert h.fallback.enabled is not None
    assert h.fallback.enabled[0].startswith("No worker can serve requests right now: a worker process could not be started.")
    h.ops.fail_spawn = False
    h.run(3)
    assert len(h.ops.alive()) == 1, "while failing, one trial at a time"
    h.ops.alive()[0].become_ready()
    h.run(1)
    assert len(h.ops.alive()) == 2


# -- hangs


def test_stall_is_detected_after_stall_timeout_then_term_then_kill_then_replaced() -> None:
    h = Harness(STALL_TIMEOUT=2, KILL_TIMEOUT=3, RESTART_AFTER_REQUESTS=0)
    first, _ = h.ready_pool()
    first.start_generation(drains=False)
    h.tick()
    for _ in range(8):  # tokens keep coming for 2 s: fine
        first.tick_progress()
        h.tick(0.25)
    assert first.signals == []
    h.run(2.75)  # no token for STALL_TIMEOUT: the worker's own limit fires first; we wait a margin
    assert first.signals == []
    h.run(0.5)
    assert first.signals == ["TERM"]
    handle = h.arbiter.workers[first.spec.worker_id]
    assert handle.phase is Phase.TERMINATING and "no progress" in handle.hang_cause
    h.run(2.75)
    assert first.signals == ["TERM"]
    h.run(0.5)
    assert first.signals == ["TERM", "KILL"]
    assert len(h.ops.alive()) == 3, "replaced as soon as it was declared hung"
    first.returncode = -signal.SIGKILL
    h.tick()
    assert first.spec.worker_id not in h.arbiter.workers
    assert h.arbiter.backoff.failures == 1


def test_generation_past_request_timeout_counts_as_hang_even_with_progress() -> None:
    h = Harness(REQUEST_TIMEOUT=5, STALL_TIMEOUT=2, RESTART_AFTER_REQUESTS=0)
    first, _ = h.ready_pool()
    first.start_generation(drains=False)
    h.tick()
    for _ in range(23):
        first.tick_progress()
        h.tick(0.25)
    assert first.signals == []
    for _ in range(3):
        first.tick_progress()
        h.tick(0.25)
    assert first.signals == ["TERM"]
    assert "REQUEST_TIMEOUT" in h.arbiter.workers[first.spec.worker_id].hang_cause


def test_request_timeout_applies_to_each_inference_of_a_request_not_to_their_sum() -> None:
    h = Harness(REQUEST_TIMEOUT=5, STALL_TIMEOUT=2, RESTART_AFTER_REQUESTS=0)
    first, _ = h.ready_pool()
    for _ in range(3):  # OpenAI n=3: three inferences of 4 s back to back, never seen idle in between
        first.start_generation(drains=False)
        for _ in range(16):
            first.tick_progress()
            h.tick(0.25)
    assert first.signals == []


def test_boot_timeout() -> None:
    h = Harness(BOOT_TIMEOUT=10)
    h.tick()
    first = h.ops.children[0]
    first.report(WorkerState.BOOTING)
    h.ops.children[1].become_ready()
    h.run(9.75)
    assert first.signals == []
    h.run(0.5)
    assert first.signals == ["TERM"]
    assert "BOOT_TIMEOUT" in h.arbiter.workers[first.spec.worker_id].hang_cause


def test_a_worker_frozen_while_loading_is_found_by_its_probes_long_before_boot_timeout() -> None:
    h = Harness(BOOT_TIMEOUT=120, HEALTH_INTERVAL=1)
    h.tick()
    frozen, quiet = h.ops.children
    frozen.report(WorkerState.BOOTING)  # its first sentinel names its control port
    quiet.report(WorkerState.BOOTING, control_port=None)
    frozen.healthy = quiet.healthy = False
    h.run(3.5)
    assert frozen.signals == ["TERM"]
    assert h.arbiter.workers[frozen.spec.worker_id].hang_cause == (
        "it did not answer 3 health probes in a row while loading its model")
    assert quiet.probes == 0 and quiet.signals == [], "no port announced, nothing to probe: BOOT_TIMEOUT applies"
    assert len(h.ops.alive()) == 3, "a replacement loads at once"


def test_a_loading_worker_that_answers_its_probes_is_left_to_load() -> None:
    h = Harness(BOOT_TIMEOUT=120, HEALTH_INTERVAL=1)
    h.tick()
    slow, _ = h.ops.children
    slow.report(WorkerState.BOOTING)
    h.run(60)
    assert slow.probes >= 50 and slow.signals == []


def test_repeated_health_probe_failures_mean_a_hang_but_one_does_not() -> None:
    h = Harness(HEALTH_INTERVAL=1)
    first, second = h.ready_pool()
    first.healthy = False
    h.run(1.0)
    first.healthy = True
    h.run(5)
    assert first.signals == []
    second.healthy = False
    h.run(3.5)
    assert second.signals == ["TERM"]
    assert "3 health probes" in h.arbiter.workers[second.spec.worker_id].hang_cause


# -- memory


def test_memory_recycle_after_a_request_never_before_the_first() -> None:
    h = Harness(MAX_WORKER_MEMORY_MB=100, RESTART_AFTER_REQUESTS=0)
    first, _ = h.ready_pool()
    first.uss = 150 * MB
    h.run(10)
    assert first.sent == [], "an idle worker that never served is left alone (no recycle loop)"
    first.report(WorkerState.READY, requests_served=1)
    h.tick()
    assert len(first.sent) == 1 and first.sent[0].startswith("drain ") and "MAX_WORKER_MEMORY_MB" in first.sent[0]
    assert h.arbiter.workers[first.spec.worker_id].phase is Phase.DRAINING
    assert len(h.ops.alive()) == 3, "its replacement starts at once"
    first.returncode = EXIT_DRAINED
    h.tick()
    assert h.arbiter.backoff.failures == 0


def test_memory_under_the_limit_keeps_the_worker() -> None:
    h = Harness(MAX_WORKER_MEMORY_MB=100, RESTART_AFTER_REQUESTS=0)
    first, _ = h.ready_pool()
    first.report(WorkerState.READY, requests_served=1)
    h.run(2)
    assert first.sent == []


# -- signals


def test_sigterm_stops_gracefully_then_kills_after_the_graceful_timeout() -> None:
    h = Harness(GRACEFUL_TIMEOUT=10, RESTART_AFTER_REQUESTS=0)
    first, second = h.ready_pool()
    first.start_generation(drains=False)
    h.tick()
    h.arbiter.signals.append("SIGTERM")
    assert h.tick()
    assert h.ops.listener_closed and "STOPPING=1" in h.notes
    assert first.sent == ["stop"] and second.sent == ["stop"]
    second.returncode = EXIT_STOPPED
    h.run(9.5)
    assert first.signals == [] and len(h.ops.children) == 2, "nothing new starts while stopping"
    h.run(0.75)
    assert first.signals == ["KILL"]
    first.returncode = -signal.SIGKILL
    assert not h.tick(), "stopped once every worker is gone"


def test_second_sigint_kills_at_once() -> None:
    h = Harness()
    first, second = h.ready_pool()
    h.arbiter.signals.append("SIGINT")
    h.tick()
    h.arbiter.signals.append("SIGINT")
    h.tick()
    assert first.signals == ["KILL"] and second.signals == ["KILL"]


def test_sighup_replaces_workers_one_by_one_never_below_capacity() -> None:
    h = Harness(RESTART_AFTER_REQUESTS=0, WORKERS=1, WARM_SPARES=1)
    old = h.ready_pool()
    h.reloaded = make_settings(RESTART_AFTER_REQUESTS=0, WORKERS=1, WARM_SPARES=1, STALL_TIMEOUT=9)
    h.arbiter.signals.append("SIGHUP")
    h.tick()
    assert "RELOADING=1" in h.notes and h.arbiter.settings.stall_timeout == 9
    for _ in range(20):
        for child in h.ops.alive():
            if child.sentinel is None:
                child.become_ready()
            elif child.sent and child.returncode is None:
                child.returncode = EXIT_DRAINED
        h.tick(0.25)
        ready = [hd for hd in h.arbiter.workers.values() if hd.phase is Phase.READY]
        assert len(ready) >= 2 or len(h.ops.alive()) >= 2
    assert all(child.returncode is not None for child in old)
    assert all(child.sent == ["drain the configuration was reloaded"] for child in old)
    assert len(h.ops.alive()) == 2 and all(hd.generation == 2 for hd in h.arbiter.workers.values())
    assert h.notes.count("READY=1") == 1, "READY=1 again once the reload is complete"


def test_a_second_sighup_while_replacements_load_never_drains_the_only_ready_worker() -> None:
    """Seen with a real service: two reloads closer together than a worker's load time counted the
    first reload's replacement, still loading, as capacity and drained the only READY worker."""
    h = Harness(RESTART_AFTER_REQUESTS=0, WORKERS=1, WARM_SPARES=0)
    [first] = h.ready_pool()
    h.reloaded = make_settings(RESTART_AFTER_REQUESTS=0, WORKERS=1, WARM_SPARES=0)
    h.arbiter.signals.append("SIGHUP")
    h.tick()
    [_, loading] = h.ops.alive()
    h.tick(0.25)
    assert h.arbiter.workers[loading.spec.worker_id].phase is Phase.STARTING
    h.arbiter.signals.append("SIGHUP")  # the second reload, while the first one's worker still loads
    h.tick()
    assert first.sent == [], "the only READY worker stays until a replacement is READY"
    assert loading.sent == ["drain the configuration was reloaded"], "the stale loading worker goes at once"
    [newest] = [child for child in h.ops.alive() if child not in (first, loading)]
    loading.returncode = EXIT_DRAINED
    for _ in range(8):  # the newest one takes a while to load: the old one serves meanwhile
        h.tick(0.25)
        assert [hd.phase for hd in h.arbiter.workers.values() if hd.phase is Phase.READY] == [Phase.READY]
    assert first.sent == []
    newest.become_ready()
    h.tick()
    assert first.sent == ["drain the configuration was reloaded"]
    first.returncode = EXIT_DRAINED
    h.tick()
    assert [hd.generation for hd in h.arbiter.workers.values()] == [3]
    assert h.notes.count("READY=1") == 1, "the reload completed"


def test_bad_configuration_on_reload_keeps_the_running_one(caplog: pytest.LogCaptureFixture) -> None:
    from api.config import ConfigError

    h = Harness()
    h.ready_pool()

    def broken() -> Settings:
        raise ConfigError("WORKERS", "many", "a whole number")

    h.arbiter.reload_settings = broken
    h.arbiter.signals.append("SIGHUP")
    h.tick()
    assert h.arbiter.generation == 1 and "was not reloaded" in caplog.text


def test_watchdog_pings_while_the_loop_runs() -> None:
    h = Harness()
    h.ready_pool()
    h.notes.clear()
    h.run(3)
    assert 2 <= sum(note.startswith("WATCHDOG=1") for note in h.notes) <= 4


def pings(notes: list[str]) -> int:
    return sum(note.startswith("WATCHDOG=1") for note in notes)


def test_watchdog_pings_stop_while_the_loops_threads_are_broken() -> None:
    h = Harness()
    h.ready_pool()
    h.problem = "the log writer thread has died"
    h.notes.clear()
    h.run(3)
    assert pings(h.notes) == 0 and "STATUS=unhealthy: the log writer thread has died" in h.notes
    h.problem = ""
    h.run(2)
    assert pings(h.notes) >= 1


def test_watchdog_pings_stop_once_served_while_a_generation_shows_no_progress_past_every_remedy() -> None:
    h = Harness(RESTART_AFTER_REQUESTS=0, STALL_TIMEOUT=2, KILL_TIMEOUT=1)
    a, _spare = h.ready_pool()
    a.start_generation(drains=False)
    h.tick()
    a.report(WorkerState.READY, generating=False, requests_served=1)
    h.tick()
    assert h.arbiter.last_served_at is not None
    a.start_generation(drains=False)  # and then nothing: TERM, KILL, and the process still does not go
    h.tick()
    h.notes.clear()
    h.run(h.arbiter.progress_limit() + 2)
    assert a.signals[:2] == ["TERM", "KILL"]
    assert any(note.startswith("STATUS=unhealthy: no generation made progress") for note in h.notes), h.notes
    assert not h.notes[-1].startswith("WATCHDOG=1")


def test_a_request_served_by_a_worker_that_exits_before_the_next_read_still_counts_as_served() -> None:
    """With a restart per request a worker serves and exits between two passes of the loop; only its
    last words (the sentinel read when it is reaped) say it served. Even if it was killed right after."""
    for code in (EXIT_SERVED, -9):
        h = Harness(WARM_SPARES=0)
        [a] = h.ready_pool()
        assert h.arbiter.last_served_at is None
        a.report(WorkerState.DRAINING, generating=False, requests_served=1)
        a.returncode = code  # gone before the loop read that sentinel
        h.tick()
        assert h.arbiter.last_served_at is not None, code


def test_watchdog_keeps_pinging_before_the_first_request_even_if_no_worker_ever_loads() -> None:
    h = Harness(RESTART_BACKOFF_MAX=2, BOOT_TIMEOUT=2)
    for _ in range(40):
        fail_booting(h)
        h.tick(0.25)
    assert pings(h.notes) >= 8 and not any("unhealthy" in note for note in h.notes)


def test_overload_refuses_newcomers_only_with_max_queue_while_no_worker_is_free() -> None:
    h = Harness(MAX_QUEUE=1, RESTART_AFTER_REQUESTS=0)
    a, _spare = h.ready_pool()
    a.start_generation(drains=False)
    h.tick()
    assert h.fallback.enabled is None, "the spare is free: it takes the next client itself"
    h.line.count = 1  # the spare holds a waiting client
    h.tick()
    assert h.fallback.enabled is not None and h.fallback.code == "queue_full"
    reason, retry_after = h.fallback.enabled
    assert "MAX_QUEUE is 1" in reason and retry_after == 6
    h.line.count = 0
    h.tick()
    assert h.fallback.enabled is None
    unbounded = Harness(RESTART_AFTER_REQUESTS=0)
    b, _spare = unbounded.ready_pool()
    b.start_generation(drains=False)
    unbounded.line.count = 1
    unbounded.tick()
    assert unbounded.fallback.enabled is None, "no MAX_QUEUE: clients wait in the accept queue, as they always did"


def test_overload_waits_for_a_worker_about_to_load_unless_the_line_is_full() -> None:
    h = Harness(MAX_QUEUE=2)
    a, _spare = h.ready_pool()
    a.start_generation()  # draining after this request: its replacement starts loading
    h.line.count = 1  # the spare holds a waiting client
    h.tick()
    assert sorted(handle.phase.value for handle in h.arbiter.workers.values()) == ["draining", "ready", "starting"]
    assert h.fallback.enabled is None, "the replacement is due: newcomers wait for it, it will queue one"
    h.line.count = 2
    h.tick()
    assert h.fallback.enabled is not None, "the line is full: the replacement could only refuse them"
    h.line.count = 1
    h.tick(h.arbiter.timing.short_wait + 1)
    assert h.fallback.enabled is not None, "the replacement is late: no worker is about to be free"


def test_the_end_of_the_503_period_is_logged_even_if_the_ready_state_was_never_seen(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisor")
    h = Harness(RESTART_BACKOFF_MAX=2)
    h.tick()
    fail_booting(h)
    h.tick()
    assert h.fallback.enabled is not None
    while not h.ops.alive():
        h.tick(0.25)
    trial = h.ops.alive()[0]
    trial.report(WorkerState.DRAINING, generating=True, inferences=1)  # ready and busy between two passes
    h.tick()
    trial.report(WorkerState.DRAINING, requests_served=1)
    h.tick()
    assert "the service is back after" in caplog.text


# -- metrics


def test_metrics_hear_startups_exit_reasons_and_the_pool() -> None:
    h = Harness(RESTART_AFTER_REQUESTS=1, MAX_WORKER_MEMORY_MB=100)
    first, spare = h.ready_pool()
    assert len(h.meters.startups) == 2
    h.tick(5)  # memory is sampled every HEALTH_INTERVAL
    states, generating, waiting, largest = h.meters.pools[-1]
    assert states == {"ready": 2} and generating == 0 and waiting == 0 and largest == 50 * MB
    first.start_generation()
    h.tick()
    assert h.meters.pools[-1][1] == 1
    first.finish()
    h.tick()
    assert h.meters.exits == [(first.pid, "served")]
    spare.uss = 200 * MB
    spare.start_generation(drains=False)
    spare.finish(code=0)
    spare.returncode = None
    h.tick()  # served more than checked: too big, drained
    spare.returncode = EXIT_DRAINED
    h.tick()
    assert h.meters.exits[-1] == (spare.pid, "bloated")
    crasher = h.ops.alive()[0]
    crasher.returncode = -signal.SIGSEGV
    h.tick()
    assert h.meters.exits[-1] == (crasher.pid, "crashed")
    h.tick(30)
    fail_booting(h)
    h.tick()
    assert h.meters.exits[-1][1] == "load_failed"


def test_a_worker_that_recycles_itself_after_a_failed_request_counts_as_recycled_not_crashed_nor_served() -> None:
    """A worker drains on its own (EXIT_DRAINED, no DRAIN sent) after a 500/504 or an overrun: the
    supervisor did not ask, it did not crash, and it did not end as planned after serving."""
    h = Harness()
    first, _ = h.ready_pool()
    first.start_generation(drains=False)
    h.tick()
    first.report(WorkerState.DRAINING, generating=False, reason="an inference request ended with 504")
    first.returncode = EXIT_DRAINED
    h.tick()
    assert not any(line.startswith("drain") for line in first.sent)  # the supervisor never asked
    assert h.meters.exits == [(first.pid, "recycled")]
