"""Small pure decisions of the supervisor, kept apart so tests can pin them down exactly."""

from __future__ import annotations

import random


class Backoff:
    """Delays before starting a worker again after failures in a row (crashes, hang kills).

    The first failure is retried at once (a single crash is an incident, not a pattern); from the
    second on, the delay doubles from `base` up to `maximum`, with "equal jitter": a random point in
    the upper half of the nominal delay, so that services restarted together do not retry in step.
    A worker that serves a request resets it.
    """

    def __init__(self, *, base: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.maximum = maximum
        self.rng = rng or random.Random()
        self.failures = 0

    def nominal(self, failures: int) -> float:
        if failures <= 1:
            return 0.0
        return min(self.maximum, self.base * 2 ** (failures - 2))

    def record_failure(self) -> float:
        """Count one more failure; return how long to wait before the next start."""
        self.failures += 1
        nominal = self.nominal(self.failures)
        return nominal / 2 + self.rng.uniform(0, nominal / 2)

    def reset(self) -> None:
        self.failures = 0


def restart_after_with_jitter(restart_after: int, jitter: int, rng: random.Random) -> int:
    """How many inference requests one worker serves (0: no limit), RESTART_JITTER included."""
    if restart_after <= 0:
        return 0
    return restart_after + (rng.randint(0, jitter) if jitter > 0 else 0)
