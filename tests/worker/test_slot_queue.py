"""The line for an inference slot across processes (api/slot_queue.py): its bound, its order, its
timeout, and a killed waiter's place, with real lock files and a real process killed with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from api.errors import ClientLeft, QueueFull, QueueTimeout
from api.inference_slots import InferenceSlots
from api.slot_queue import RequestTimes, SlotQueue
from testing.servers import REPO

WAIT_IN_LINE = """
import sys, time
from pathlib import Path
from api.inference_slots import InferenceSlots
place = InferenceSlots(Path(sys.argv[1]), 1, max_queue=5).admit()
print("in line", flush=True)
place.wait()
print("served", flush=True)
time.sleep(60)
"""


def test_the_line_is_bounded_and_a_refusal_takes_no_place(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 1, max_queue=1)
    running = slots.acquire()
    waiting = slots.admit()
    with pytest.raises(QueueFull) as refused:
        slots.admit()
    assert refused.value.status == 503 and refused.value.retry_after >= 1
    assert slots.queue is not None and slots.queue.waiting() == 1
    assert slots.refusal().startswith("The server is at capacity")
    running()
    waiting.wait()()
    assert slots.refusal() == "" and slots.queue.waiting() == 0


def test_max_queue_zero_admits_only_while_a_slot_is_free(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 1, max_queue=0)
    assert slots.refusal() == ""
    release = slots.acquire()
    with pytest.raises(QueueFull):
        slots.admit()
    release()
    slots.acquire()()


def test_waiters_are_served_in_the_order_they_came(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 1, max_queue=10)
    running = slots.acquire()
    order: list[int] = []
    places = [slots.admit() for _ in range(4)]  # admitted in this order

    def serve(index: int) -> None:
        release = places[index].wait()
        order.append(index)
        time.sleep(0.02)
        release()

    threads = [threading.Thread(target=serve, args=(index,)) for index in (3, 1, 0, 2)]  # they start waiting out of order
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    running()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3]


def test_a_waiter_times_out_or_leaves_and_gives_its_place_back(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 1, max_queue=1, queue_timeout=0.3)
    running = slots.acquire()
    started = time.monotonic()
    with pytest.raises(QueueTimeout):
        slots.acquire()
    assert 0.3 <= time.monotonic() - started < 2
    gone_at = time.monotonic() + 0.2
    with pytest.raises(ClientLeft):
        slots.acquire(lambda: time.monotonic() > gone_at, timeout=30)
    assert time.monotonic() - gone_at < 0.5, "given up at once"
    assert slots.queue is not None and slots.queue.waiting() == 0
    running()


def test_the_place_of_a_killed_waiter_is_not_kept(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 1, max_queue=5)
    running = slots.acquire()
    other = subprocess.Popen([sys.executable, "-c", WAIT_IN_LINE, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline() == b"in line\n"
        mine = slots.admit()  # behind the other process
        assert slots.queue is not None and slots.queue.waiting() == 2
        other.send_signal(signal.SIGKILL)
        other.wait(5)
        assert slots.queue.waiting() == 1, "a dead owner's ticket does not count"
        running()
        mine.wait(timeout=5)()  # it went first: the dead one's place was not waited for
    finally:
        other.kill()
        other.wait(5)


def test_retry_after_follows_the_observed_time_and_the_line(tmp_path: Path) -> None:
    times = RequestTimes(tmp_path)
    for _ in range(30):
        times.record(2.0)
    assert abs(times.average() - 2.0) < 0.01
    assert SlotQueue(tmp_path, 4, slots=2).retry_after(3) == 4  # (3 waiting + 1) x 2 s over 2 slots
    assert SlotQueue(tmp_path, 4).retry_after(0) == 2
