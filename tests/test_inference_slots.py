"""The WORKERS inference slots that worker processes share through lock files in the run folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from api.inference_slots import InferenceSlots
from tests.servers import REPO

HOLD_A_SLOT = """
import sys, time
from pathlib import Path
from api.inference_slots import InferenceSlots
release = InferenceSlots(Path(sys.argv[1]), 1).acquire(timeout=5)  # kept: the slot lives as long as it does
assert release is not None
print("holding", flush=True)
time.sleep(60)
"""


def test_no_more_than_count_at_once_and_a_returned_slot_is_free_again(tmp_path: Path) -> None:
    slots = InferenceSlots(tmp_path, 2)
    first, second = slots.acquire(timeout=1), slots.acquire(timeout=1)
    assert first is not None and second is not None
    started = time.monotonic()
    assert slots.acquire(timeout=0.2) is None
    assert time.monotonic() - started >= 0.2, "it waited for the timeout"
    first()
    third = slots.acquire(timeout=1)
    assert third is not None
    second()
    third()


def test_a_slot_given_back_by_another_thread_wakes_a_waiter(tmp_path: Path) -> None:
    """The request thread takes the slot; the model thread gives it back."""
    slots = InferenceSlots(tmp_path, 1)
    release = slots.acquire(timeout=1)
    assert release is not None
    threading.Timer(0.1, release).start()
    assert slots.acquire(timeout=5) is not None


def test_the_slot_of_a_killed_process_is_free(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        slots = InferenceSlots(tmp_path, 1)
        assert slots.acquire(timeout=0.2) is None, "another process holds the only slot"
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        assert slots.acquire(timeout=2) is not None
    finally:
        holder.kill()
        holder.wait(5)


def test_without_a_folder_there_is_no_limit() -> None:
    slots = InferenceSlots(None, 1)
    assert all(slots.acquire(timeout=0) is not None for _ in range(5))
