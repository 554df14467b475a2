"""The WORKERS inference slots that worker processes share through lock files in the run folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from api.inference_slots import InferenceSlots, Release
from testing.servers import REPO

HOLD_A_SLOT = """
import sys, time
from pathlib import Path
import pytest

from api.inference_slots import InferenceSlots
release = InferenceSlots(Path(sys.argv[1]), 1).acquire()
print("holding", flush=True)
time.sleep(60)
"""


def acquire_in_thread(slots: InferenceSlots, order: list[str], name: str) -> tuple[threading.Thread, list[Release]]:
    """Start waiting for a slot in a thread; its release function lands in the list once it has one."""
    got: list[Release] = []

    def wait() -> None:
        got.append(slots.acquire())
        order.append(name)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, got


def eventually(predicate: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_no_more_than_count_at_once_and_a_returned_slot_is_taken_by_a_waiter(tmp_path: Path) -> None:
    slots, order = InferenceSlots(tmp_path, 2), []
    first, second = slots.acquire(), slots.acquire()
    thread, got = acquire_in_thread(slots, order, "third")
    time.sleep(0.3)
    assert not got, "both slots are taken: the third waits"
    first()
    thread.join(5)
    assert got, "the returned slot went to the waiter"
    second()
    got[0]()


@pytest.mark.parametrize("count", [1, 2])
def test_a_waiter_queued_first_is_served_before_a_newcomer(tmp_path: Path, count: int) -> None:
    """The worker that just gave its slot back cannot take it again ahead of one that waits."""
    slots, order = InferenceSlots(tmp_path, count), []
    held, *others = [slots.acquire() for _ in range(count)]
    _, waiter = acquire_in_thread(slots, order, "waiter")
    time.sleep(0.2)
    held()
    newcomer_thread, newcomer = acquire_in_thread(slots, order, "newcomer")
    assert eventually(lambda: bool(order))
    time.sleep(0.2)
    assert order == ["waiter"]
    waiter[0]()
    newcomer_thread.join(5)
    assert order == ["waiter", "newcomer"]
    newcomer[0]()
    for release in others:
        release()


def test_the_slot_of_a_killed_process_is_free(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        thread, got = acquire_in_thread(InferenceSlots(tmp_path, 1), [], "after the kill")
        time.sleep(0.3)
        assert not got, "another process holds the only slot"
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        thread.join(5)
        assert got
    finally:
        holder.kill()
        holder.wait(5)


def test_giving_a_slot_back_twice_closes_nothing_else(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 1)
    release = slots.acquire()
    release()
    with open(tmp_path / "other", "w") as other:  # likely the descriptor number just freed
        release()
        other.write("still open")
    assert slots.acquire() is not None


def test_without_a_folder_there_is_no_limit() -> None:
    slots = InferenceSlots(None, 1)
    assert all(slots.acquire() is not None for _ in range(5))
