"""Keep workers that load in the same second from sampling identically.

gpt4all 2.8.2 seeds each model's sampler from the clock, in whole seconds, when the model loads,
and offers no way to set the seed. Two workers that load in the same second would therefore give
the same "random" reply to the same prompt, which restart-per-request makes likely.

Each worker claims a numbered slot for the second(s) its load spanned, with an O_EXCL file in the
run folder shared by all workers. The worker in slot k then advances its sampler by k draws, so
every worker of that second starts from a different random state. The common case (one load per
second) costs nothing; the k-th load of a busy second costs k throwaway tokens.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

SLOT_FOLDER = "sampler-seeds"
_KEEP_SECONDS = 120
_MAX_SLOTS = 256


def claim_slot(run_dir: Path, loaded_from: float, loaded_until: float) -> int:
    """Return how many sampler draws this worker should skip (0 for the first load of a second)."""
    folder = run_dir / SLOT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    _forget_old_slots(folder)
    return max(_claim(folder, second) for second in range(int(loaded_from), int(loaded_until) + 1))


def _claim(folder: Path, second: int) -> int:
    for slot in range(_MAX_SLOTS):
        try:
            os.close(os.open(folder / f"{second}-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return slot
        except FileExistsError:
            continue
    return _MAX_SLOTS


def _forget_old_slots(folder: Path) -> None:
    horizon = time.time() - _KEEP_SECONDS
    for entry in folder.iterdir():
        with contextlib.suppress(ValueError, OSError):
            if int(entry.name.split("-", 1)[0]) < horizon:
                entry.unlink()
