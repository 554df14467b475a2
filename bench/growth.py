"""Does the daemon's cost stay flat as work grows? Time per request as the prompt grows (64, 256,
1024 tokens) and as max_tokens grows, through HTTP and in-process on the same model."""

from __future__ import annotations

import time

from bench.measure import interleave, post_json
from bench.overhead import ENDLESS_PROMPT, InProcess, time_row

PROMPT_SIZES = (64, 256, 1024)
REPLY_SIZES = (16, 64, 256)
_FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "


def prompt_of(baseline: InProcess, tokens: int) -> str:
    """A completion prompt of about `tokens` tokens, measured with the model's own tokenizer."""
    per_filler = _prompt_tokens(baseline, _FILLER * 8) / 8
    return _FILLER * max(1, round(tokens / per_filler))


def _prompt_tokens(baseline: InProcess, prompt: str) -> int:
    return baseline.generate(prompt, 1).prompt_tokens


def _local(baseline: InProcess, prompt: str, max_tokens: int) -> float:
    started = time.perf_counter()
    baseline.generate(prompt, max_tokens)
    return time.perf_counter() - started


def _remote(port: int, prompt: str, max_tokens: int) -> float:
    status, body, seconds, _worker = post_json(port, "/v1/completions", {"prompt": prompt, "temperature": 0,
                                                               "max_tokens": max_tokens})
    assert status == 200, body
    return seconds


def run(port: int, baseline: InProcess, runs: int, prompt_sizes: tuple[int, ...] = PROMPT_SIZES,
        reply_sizes: tuple[int, ...] = REPLY_SIZES) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for size in prompt_sizes:
        prompt = prompt_of(baseline, size)
        remote, local = interleave(runs, lambda p=prompt: _remote(port, p, 1), lambda p=prompt: _local(baseline, p, 1))
        results[f"prompt_{size}_tokens"] = time_row(remote.median, local.median)
    for size in reply_sizes:
        remote, local = interleave(runs, lambda n=size: _remote(port, ENDLESS_PROMPT, n),
                                   lambda n=size: _local(baseline, ENDLESS_PROMPT, n))
        results[f"reply_{size}_tokens"] = time_row(remote.median, local.median)
    return results


