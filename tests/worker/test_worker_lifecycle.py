"""The worker's own life (api.worker.lifecycle.WorkerLifecycle) and the sentinel contract (api.protocol),
without processes: a fake clock, sentinel writes collected in a list."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from api.protocol import (
    EXIT_DRAINED,
    EXIT_MODEL_LOAD_FAILED,
    EXIT_SERVED,
    Sentinel,
    WorkerState,
    describe_exit,
    read_sentinel,
    write_sentinel,
)
from api.worker.lifecycle import PROGRESS_WRITE_INTERVAL, TRANSITIONS, WorkerLifecycle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.written: list[Sentinel] = []
        self.accepting: list[bool] = []

    def write(self, _path: Path, sentinel: Sentinel) -> None:
        self.written.append(sentinel)

    @property
    def last(self) -> Sentinel:
        return self.written[-1]


def make(restart_after: int = 1, request_timeout: float = 10, stall_timeout: float = 3) -> tuple[WorkerLifecycle, Clock, Recorder]:
    clock, recorder = Clock(), Recorder()
    lifecycle = WorkerLifecycle(7, Path("unused"), restart_after=restart_after, request_timeout=request_timeout,
                                stall_timeout=stall_timeout, clock=clock, write=recorder.write,
                                set_accepting=recorder.accepting.append)
    lifecycle.report()
    lifecycle.ready()
    return lifecycle, clock, recorder


def task(status: str = "200 OK") -> SimpleNamespace:
    return SimpleNamespace(touched_model=False, status=status)


def serve(lifecycle: WorkerLifecycle, clock: Clock, *, generations: int = 1, status: str = "200 OK",
          seconds: float = 0.1) -> SimpleNamespace:
    """One HTTP request that runs `generations` inferences, as a waitress task would."""
    current = task(status)
    for _ in range(generations):
        lifecycle.inference_started(current)
        clock.now += seconds
        lifecycle.progress()
        lifecycle.inference_finished()
    lifecycle.request_finished(current)  # type: ignore[arg-type]
    return current


def test_boot_then_ready_opens_the_public_socket() -> None:
    _lifecycle, _, recorder = make()
    assert [s.state for s in recorder.written] == [WorkerState.BOOTING, WorkerState.READY]
    assert recorder.accepting == [True]
    assert recorder.last.pid > 0 and recorder.last.worker_id == 7


def test_a_loaded_worker_says_ready_then_accepts_only_once_past_the_accept_gate() -> None:
    recorder = Recorder()
    seen_at_the_gate: list[tuple[WorkerState, list[bool]]] = []
    lifecycle = WorkerLifecycle(7, Path("unused"), restart_after=0, request_timeout=10, stall_timeout=3,
                                write=recorder.write,
                                wait_for_gate=lambda: seen_at_the_gate.append((recorder.last.state, [*recorder.accepting])),
                                set_accepting=recorder.accepting.append)
    lifecycle.report()
    lifecycle.ready()
    assert seen_at_the_gate == [(WorkerState.READY, [])], "READY reported before the gate, no accept before it"
    assert recorder.accepting == [True]


def test_a_worker_told_to_drain_while_waiting_at_the_gate_never_accepts() -> None:
    recorder = Recorder()
    lifecycle = WorkerLifecycle(7, Path("unused"), restart_after=0, request_timeout=10, stall_timeout=3,
                                write=recorder.write, wait_for_gate=lambda: lifecycle.drain(EXIT_DRAINED, "asked"),
                                set_accepting=recorder.accepting.append)
    lifecycle.ready()
    assert True not in recorder.accepting and recorder.last.state is WorkerState.DRAINING


def test_a_request_that_will_recycle_the_worker_drains_at_its_start() -> None:
    lifecycle, _clock, recorder = make(restart_after=1)
    current = task()
    lifecycle.inference_started(current)
    assert recorder.last.state is WorkerState.DRAINING and recorder.last.generating
    assert recorder.accepting[-1] is False
    assert lifecycle.closes_connections(), "its response closes the keep-alive connection"
    assert lifecycle.exit_code == EXIT_SERVED
    lifecycle.inference_finished()
    lifecycle.request_finished(current)  # type: ignore[arg-type]
    assert lifecycle.idle() and recorder.last.requests_served == 1
    assert recorder.last.state is WorkerState.DRAINING, "DRAINING is final"


def test_without_a_restart_limit_busy_returns_to_ready() -> None:
    lifecycle, _clock, recorder = make(restart_after=0)
    current = task()
    lifecycle.inference_started(current)
    assert recorder.last.state is WorkerState.BUSY and recorder.accepting[-1] is False
    assert not lifecycle.closes_connections()
    lifecycle.inference_finished()
    assert recorder.last.state is WorkerState.BUSY, "the response is not sent yet"
    lifecycle.request_finished(current)  # type: ignore[arg-type]
    assert recorder.last.state is WorkerState.READY and recorder.accepting[-1] is True
    assert lifecycle.exit_code is None


def test_a_worker_takes_one_client_at_a_time() -> None:
    lifecycle, clock, recorder = make(restart_after=0)
    lifecycle.client_connected(1)  # accepted: no second connection until this one is answered
    assert recorder.accepting[-1] is False and recorder.last.state is WorkerState.READY
    lifecycle.client_engaged(2)  # a request on a kept-alive connection accepted earlier
    serve(lifecycle, clock)
    assert recorder.last.state is WorkerState.READY and recorder.accepting[-1] is False, "clients still engaged"
    lifecycle.client_released(1)
    assert recorder.accepting[-1] is False
    lifecycle.client_released(2)
    assert recorder.accepting[-1] is True
    lifecycle.client_released(2)  # a connection closing after its answer: nothing changes
    assert recorder.accepting.count(True) == 2


def test_a_released_client_does_not_reopen_a_busy_or_draining_worker() -> None:
    lifecycle, _clock, recorder = make(restart_after=1)
    lifecycle.client_connected(1)
    current = task()
    lifecycle.inference_started(current)
    lifecycle.client_connected(2)
    lifecycle.client_went_silent(2)  # a silent second connection let go while the first generates
    assert recorder.accepting[-1] is False and recorder.last.state is WorkerState.DRAINING
    lifecycle.inference_finished()
    lifecycle.request_finished(current)  # type: ignore[arg-type]
    lifecycle.client_released(1)
    assert recorder.accepting[-1] is False, "DRAINING never accepts again"


def test_while_silent_connections_stay_open_new_ones_do_not_hold_the_worker() -> None:
    """A slowloris: each silent connection would otherwise hold the worker for its grace, one
    after another, and the client queued behind them would wait for all of them."""
    lifecycle, _clock, recorder = make(restart_after=0)
    lifecycle.client_connected(1)
    assert recorder.accepting[-1] is False, "a fresh connection holds the worker for its grace"
    lifecycle.client_went_silent(1)
    assert recorder.accepting[-1] is True
    flips = len(recorder.accepting)
    for key in range(2, 22):  # the rest of the slowloris, accepted at once
        lifecycle.client_connected(key)
        lifecycle.client_went_silent(key)
    assert len(recorder.accepting) == flips, "none of them held the worker"
    lifecycle.client_connected(22)  # a real client among them
    lifecycle.client_engaged(22)  # its request arrives
    assert recorder.accepting[-1] is False, "a request holds the worker until it is answered"
    lifecycle.client_released(22)
    assert recorder.accepting[-1] is True
    for key in range(1, 22):
        lifecycle.client_closed(key)
    lifecycle.client_connected(23)
    assert recorder.accepting[-1] is False, "once the silent ones are gone, a fresh connection holds the worker again"


def test_a_silent_connection_that_sends_a_request_at_last_is_served_as_any_other() -> None:
    lifecycle, _clock, recorder = make(restart_after=0)
    lifecycle.client_connected(1)
    lifecycle.client_went_silent(1)
    lifecycle.client_engaged(1)
    assert recorder.accepting[-1] is False
    lifecycle.client_released(1)
    lifecycle.client_connected(2)
    assert recorder.accepting[-1] is False, "no silent connection is left: holds are back"


def test_busy_returns_to_ready_when_the_model_thread_finishes_after_the_response() -> None:
    """The request thread can send the last byte before the model thread has reported the end of
    the generation; whichever comes last makes the worker READY again."""
    lifecycle, _clock, recorder = make(restart_after=0)
    current = task()
    lifecycle.inference_started(current)
    lifecycle.request_finished(current)  # type: ignore[arg-type]
    assert recorder.last.state is WorkerState.BUSY, "the generation has not reported its end yet"
    lifecycle.inference_finished()
    assert recorder.last.state is WorkerState.READY and recorder.accepting[-1] is True


def test_one_http_request_with_several_generations_counts_once() -> None:
    lifecycle, clock, _recorder = make(restart_after=2)
    serve(lifecycle, clock, generations=3)
    assert lifecycle.requests_started == 1 and lifecycle.requests_served == 1
    assert lifecycle.exit_code is None
    serve(lifecycle, clock, generations=1)
    assert lifecycle.exit_code == EXIT_SERVED and lifecycle.requests_served == 2


def test_requests_that_touch_no_model_do_not_count() -> None:
    lifecycle, _clock, _recorder = make(restart_after=1)
    lifecycle.request_finished(task())  # type: ignore[arg-type]
    assert lifecycle.requests_served == 0 and lifecycle.exit_code is None


def test_an_inference_without_a_request_counts_as_its_own_request() -> None:
    lifecycle, _clock, recorder = make(restart_after=0)
    lifecycle.inference_started(None)
    lifecycle.inference_finished()
    assert lifecycle.requests_served == 1 and recorder.last.state is WorkerState.READY


def test_progress_heartbeats_are_throttled() -> None:
    lifecycle, clock, recorder = make(restart_after=0)
    lifecycle.inference_started(task())
    before = len(recorder.written)
    for _ in range(100):  # 100 tokens in 1 s
        clock.now += 0.01
        lifecycle.progress()
    writes = len(recorder.written) - before
    assert 1 <= writes <= 1 / PROGRESS_WRITE_INTERVAL + 1
    assert recorder.last.progress == writes and recorder.last.last_token_at is not None


def test_a_generation_over_request_timeout_recycles_the_worker() -> None:
    lifecycle, clock, recorder = make(restart_after=0, request_timeout=5, stall_timeout=5)
    current = task("504 GATEWAY TIMEOUT")
    lifecycle.inference_started(current)
    for _ in range(6):
        clock.now += 1
        lifecycle.progress()
    lifecycle.check_overtime()
    assert lifecycle.exit_code == EXIT_DRAINED and "REQUEST_TIMEOUT" in lifecycle.reason
    assert recorder.last.state is WorkerState.DRAINING


def test_a_stalled_generation_recycles_the_worker_when_it_ends() -> None:
    lifecycle, clock, _recorder = make(restart_after=0, request_timeout=60, stall_timeout=3)
    lifecycle.inference_started(task())
    clock.now += 4  # no token for 4 s
    lifecycle.progress()
    lifecycle.inference_finished()
    assert lifecycle.exit_code == EXIT_DRAINED and "STALL_TIMEOUT" in lifecycle.reason


@pytest.mark.parametrize(("status", "drains"), [("504 GATEWAY TIMEOUT", True), ("500 INTERNAL SERVER ERROR", True),
                                                ("503 SERVICE UNAVAILABLE", False), ("400 BAD REQUEST", False)])
def test_a_failed_inference_request_recycles_the_worker(status: str, drains: bool) -> None:
    lifecycle, clock, _ = make(restart_after=0)
    serve(lifecycle, clock, status=status)
    assert (lifecycle.exit_code == EXIT_DRAINED) is drains


def test_drain_on_command_and_the_first_reason_stays() -> None:
    lifecycle, clock, recorder = make(restart_after=0)
    lifecycle.drain(EXIT_DRAINED, "memory")
    lifecycle.drain(EXIT_SERVED, "later reason")
    assert lifecycle.exit_code == EXIT_DRAINED and recorder.last.reason == "memory"
    assert recorder.accepting[-1] is False and lifecycle.idle()
    serve(lifecycle, clock)
    assert recorder.last.state is WorkerState.DRAINING


def test_load_failure_is_reported_with_its_reason() -> None:
    clock, recorder = Clock(), Recorder()
    lifecycle = WorkerLifecycle(1, Path("unused"), restart_after=1, request_timeout=1, stall_timeout=1, clock=clock,
                                write=recorder.write)
    lifecycle.load_failed("Unsupported file format")
    assert lifecycle.exit_code == EXIT_MODEL_LOAD_FAILED
    assert recorder.last.state is WorkerState.BOOTING and recorder.last.reason == "Unsupported file format"


# -- the sentinel file


def test_sentinel_round_trip_is_atomic_and_tolerates_garbage(tmp_path: Path) -> None:
    path = tmp_path / "worker-3.json"
    assert read_sentinel(path) is None
    sentinel = Sentinel(worker_id=3, pid=42, state=WorkerState.BUSY, requests_served=2, generating=True, progress=9,
                        last_token_at=1.5, control_port=4000, reason="")
    write_sentinel(path, sentinel)
    read = read_sentinel(path)
    assert read is not None and read.updated_at > 0
    assert read == Sentinel(**{**sentinel.__dict__, "updated_at": read.updated_at})
    assert [p.name for p in tmp_path.iterdir()] == ["worker-3.json"], "no temporary file left"
    path.write_text('{"state": "NAPPING"}')
    assert read_sentinel(path) is None
    path.write_text("[1, 2")
    assert read_sentinel(path) is None


def test_sentinel_summary_reads_like_a_sentence() -> None:
    sentinel = Sentinel(worker_id=3, pid=42, state=WorkerState.DRAINING, requests_served=1, generating=True,
                        reason="served RESTART_AFTER_REQUESTS (1) inference request(s)")
    assert sentinel.summary() == ("state DRAINING, 1 request(s) served, generating, "
                                  "reason: served RESTART_AFTER_REQUESTS (1) inference request(s)")


def test_exit_codes_and_signals_in_words() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGBUS).startswith("killed by SIGBUS (a mapped file changed under it: was the model file")
    assert describe_exit(EXIT_SERVED) == "exited with code 10 (served its requests)"
    assert describe_exit(EXIT_MODEL_LOAD_FAILED) == "exited with code 11 (the model could not be loaded)"
    assert describe_exit(1) == "exited with code 1"


def test_draining_is_final_and_every_state_can_drain() -> None:
    assert TRANSITIONS[WorkerState.DRAINING] == frozenset()
    assert all(WorkerState.DRAINING in allowed for state, allowed in TRANSITIONS.items() if state is not WorkerState.DRAINING)
    lifecycle, _clock, recorder = make()
    lifecycle.drain(EXIT_DRAINED, "test")
    lifecycle.ready()
    assert lifecycle.state is WorkerState.DRAINING and recorder.accepting[-1] is False


def test_a_failed_request_is_answered_but_not_counted_as_served() -> None:
    """The sentinel's requests_served tells the supervisor the model works: a 500 must not say so,
    yet the worker is as free again as after a success."""
    lifecycle, clock, recorder = make(restart_after=0)
    serve(lifecycle, clock, status="500 INTERNAL SERVER ERROR")
    assert recorder.last.requests_served == 0
    lifecycle, clock, recorder = make(restart_after=0)
    serve(lifecycle, clock, status="400 BAD REQUEST")
    assert recorder.last.requests_served == 0 and recorder.last.state is WorkerState.READY
    serve(lifecycle, clock)
    assert recorder.last.requests_served == 1
