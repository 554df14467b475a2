"""What HTTP and the worker add to a generation: a 1-token request, the first streamed token and
the decode rate, each beside the same call made in-process on the same model in the same run."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from api.engine import ChatModel, SamplingParams
from bench.measure import first_streamed_token, interleave, post_json

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
DECODE_TOKENS = 128


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
        first, total, tokens = self._run(DECODE_TOKENS, ignore_eos=True)
        return (tokens - 1) / (total - first) if total > first else 0.0

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

        prompt = "0 1 2 3 4 5 6 7" if ignore_eos else self.prompt  # a prompt that does not end early
        self.model.acquire(60)
        try:
            self.model.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), sink,
                                cancel=threading.Event())
        finally:
            self.model.release()
        total = time.perf_counter() - started
        return (first[0] if first else total), total, count


def _chat_body(max_tokens: int) -> dict:
    return {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}


def run(port: int, baseline: InProcess, runs: int) -> dict[str, dict[str, float]]:
    """Measure the daemon on `port` against the in-process baseline, interleaved."""

    def http_one_token() -> float:
        status, body, seconds = post_json(port, "/v1/chat/completions", _chat_body(1))
        assert status == 200 and body["usage"]["completion_tokens"] == 1, body
        return seconds

    def http_first_token() -> float:
        return first_streamed_token(port, "/v1/chat/completions", _chat_body(DECODE_TOKENS))[0]

    def http_decode_rate() -> float:
        first, total, events = first_streamed_token(port, "/v1/completions", {
            "prompt": "0 1 2 3 4 5 6 7", "temperature": 0, "max_tokens": DECODE_TOKENS})
        return (events - 1) / (total - first) if total > first else 0.0

    one_http, one_local = interleave(runs, http_one_token, baseline.one_token)
    first_http, first_local = interleave(runs, http_first_token, baseline.first_token)
    rate_http, rate_local = interleave(max(2, runs // 3), http_decode_rate, baseline.decode_rate)
    return {
        "one_token_request": _pair_ms(one_http.median_ms, one_local.median_ms),
        "first_streamed_token": _pair_ms(first_http.median_ms, first_local.median_ms),
        "decode_tokens_per_second": {"daemon": round(rate_http.median, 1), "in_process": round(rate_local.median, 1),
                                     "ratio": round(rate_http.median / rate_local.median, 3)},
    }


def _pair_ms(daemon_ms: float, local_ms: float) -> dict[str, float]:
    return {"daemon_ms": round(daemon_ms, 1), "in_process_ms": round(local_ms, 1),
            "added_ms": round(daemon_ms - local_ms, 1), "ratio": round(daemon_ms / local_ms, 3)}
