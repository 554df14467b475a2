"""What the daemon adds to a generation: a 1-token request, the first streamed token and the
decode rate, each beside the same call made in-process on the same model and threads in the same
run. Measured on the daemon as it ships (a fresh worker for every request) and without restarts,
because the replacement that loads while a request runs shares the machine with it."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from api.engine import ChatModel
from api.inference import EngineRun
from api.sampling import SamplingParams
from bench.measure import first_streamed_token, interleave, post_json

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
DECODE_TOKENS = 128
RowMaker = Callable[[float, float], dict[str, float]]  # (daemon, in-process) -> a table row
ENDLESS_PROMPT = "0 1 2 3 4 5 6 7"  # a prompt the model keeps continuing, so max_tokens is what stops it


@dataclass(frozen=True)
class InProcess:
    """The baseline: our engine called directly, no HTTP, no worker process."""

    model: ChatModel
    prompt: str

    @classmethod
    def load(cls, path: Path, threads: int, n_ctx: int) -> InProcess:
        model = ChatModel(path, n_ctx=n_ctx, n_threads=threads)
        return cls(model, model.template.render(QUESTION))

    def one_token(self) -> float:
        return self._run(1)[1]

    def first_token(self) -> float:
        return self._run(DECODE_TOKENS)[0]

    def decode_rate(self) -> float:
        return decode_rate(*self._run(DECODE_TOKENS, ignore_eos=True))

    def generate(self, prompt: str, max_tokens: int, sink: Callable[[str], bool] = lambda _text: True) -> EngineRun:
        """One greedy generation under the model's lock, as a worker runs it."""
        self.model.acquire(60)
        try:
            return self.model.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), sink,
                                       cancel=threading.Event())
        finally:
            self.model.release()

    def _run(self, max_tokens: int, ignore_eos: bool = False) -> tuple[float, float, int]:
        started = time.perf_counter()
        first: list[float] = []
        count = 0

        def sink(_text: str) -> bool:
            nonlocal count
            count += 1
            if not first:
                first.append(time.perf_counter() - started)
            return True

        self.generate(ENDLESS_PROMPT if ignore_eos else self.prompt, max_tokens, sink)
        total = time.perf_counter() - started
        return (first[0] if first else total), total, count


def _chat_body(max_tokens: int) -> dict:
    return {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}


def run(ports: Mapping[str, int], baseline: InProcess, runs: int) -> dict[str, dict[str, float]]:
    """Measure each daemon (label -> port) against the in-process baseline, all interleaved."""
    measures: dict[str, tuple[Callable[[int], float], Callable[[], float], int, RowMaker]] = {
        "one_token_request": (http_one_token, baseline.one_token, runs, time_row),
        "first_streamed_token": (http_first_token, baseline.first_token, runs, time_row),
        "decode_tokens_per_second": (http_decode_rate, baseline.decode_rate, max(2, runs // 3), rate_row),
    }
    results = {}
    for name, (remote, local, repeats, row) in measures.items():
        *daemons, in_process = interleave(repeats, *(functools.partial(remote, port) for port in ports.values()), local)
        for label, daemon in zip(ports, daemons, strict=True):
            results[f"{name}, {label}"] = row(daemon.median, in_process.median)
    return results


def http_one_token(port: int) -> float:
    status, body, seconds, _worker = post_json(port, "/v1/chat/completions", _chat_body(1))
    assert status == 200 and body["usage"]["completion_tokens"] == 1, body
    return seconds


def http_first_token(port: int) -> float:
    return first_streamed_token(port, "/v1/chat/completions", _chat_body(DECODE_TOKENS))[0]


def http_decode_rate(port: int) -> float:
    return decode_rate(*first_streamed_token(port, "/v1/completions", {
        "prompt": ENDLESS_PROMPT, "temperature": 0, "max_tokens": DECODE_TOKENS}))


def decode_rate(first_token_seconds: float, total_seconds: float, tokens: int) -> float:
    """Tokens per second after the first one (which pays for the prompt)."""
    decode_seconds = total_seconds - first_token_seconds
    return (tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0


def time_row(daemon_seconds: float, local_seconds: float) -> dict[str, float]:
    daemon_ms, local_ms = daemon_seconds * 1000, local_seconds * 1000
    return {"daemon_ms": round(daemon_ms, 1), "in_process_ms": round(local_ms, 1),
            "added_ms": round(daemon_ms - local_ms, 1), "ratio": round(daemon_ms / local_ms, 3)}


def rate_row(daemon_rate: float, local_rate: float) -> dict[str, float]:
    return {"daemon_tokens_s": round(daemon_rate, 1), "in_process_tokens_s": round(local_rate, 1),
            "ratio": round(daemon_rate / local_rate, 3)}
