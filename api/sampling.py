"""The one sampling contract: each sampling value with its range, declared once.

`SamplingParams` is what a generation runs with. `BOUNDS` is the range of each of its fields: the
wire formats' request models are built from it (so the OpenAPI document and the 400s that name the
client's own field say the same thing) and the generation service's guard checks it, catching
whatever an adapter derives or forgets to declare before the engine gets it.

Defaults are not here: each wire format keeps the defaults of the server it stands in for (see
the README's table), and the longest reply, when a request does not say, is the service's
DEFAULT_MAX_TOKENS, applied in one place (GenerationService).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    """None: the service's DEFAULT_MAX_TOKENS (the engine always gets a number)."""
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def with_default_max_tokens(self, default: int) -> SamplingParams:
        return self if self.max_tokens is not None else dataclasses.replace(self, max_tokens=default)


@dataclass(frozen=True)
class Bound:
    """The range of one sampling value: above `low` (or at it, unless `low_open`), at most `high`."""

    kind: type[int] | type[float]
    low: float
    high: float | None = None
    low_open: bool = False
    description: str = ""

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    @property
    def expected(self) -> str:
        """The range in words, for a 400 message: "between 0 and 2", "at least 1", ..."""
        if self.high is None:
            return f"greater than {self.low:g}" if self.low_open else \
                (f"{self.low:g} or more" if self.low == 0 else f"at least {self.low:g}")
        if self.low_open:
            return f"greater than {self.low:g} and at most {self.high:g}"
        return f"between {self.low:g} and {self.high:g}"

    def annotated(self, description: str | None = None) -> Any:
        """This range as a pydantic field type, for a request model's field of any name."""
        limits: dict[str, float] = {"gt" if self.low_open else "ge": self.low}
        if self.high is not None:
            limits["le"] = self.high
        return Annotated[self.kind, Field(**limits, description=description or self.description)]


BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(int, 1, description="Longest reply, in tokens."),
    "temperature": Bound(float, 0, 2, description="Sampling temperature; 0 is greedy (deterministic)."),
    "top_p": Bound(float, 0, 1, low_open=True,
                   description="Nucleus sampling: keep the most likely tokens up to this probability mass."),
    "top_k": Bound(int, 0, description="Sample among the K most likely tokens (0: no limit)."),
    "min_p": Bound(float, 0, 1, description="Drop tokens less likely than min_p times the most likely one."),
    "repeat_penalty": Bound(float, 0, 10, low_open=True,
                            description="Multiplicative penalty on tokens seen in the last repeat_last_n tokens (1: off)."),
    "repeat_last_n": Bound(int, 0, description="How many recent tokens the repeat penalty looks at."),
}
assert set(BOUNDS) == {field.name for field in dataclasses.fields(SamplingParams)}, "a bound for every value"


def out_of_bounds(sampling: SamplingParams) -> tuple[str, Bound] | None:
    """The first value outside its range, with that range; None when all are within."""
    for name, bound in BOUNDS.items():
        value = getattr(sampling, name)
        if value is not None and not bound.holds(value):
            return name, bound
    return None
