"""An engine that keeps api/inference.py's contract without gpt4all, for wire-shape tests in-process.

It answers instantly and exactly: a prompt counts one token per UTF-8 byte (as the tiny chat model
does), the reply is FAKE_REPLY_TOKENS one at a time up to `max_tokens`, a vector is a function of
its text. Use it only where the behaviour under test is the wire format's (field names, shapes,
statuses, the error each engine error becomes); sampling, stop strings, cancellation and time
limits run through the real engine in the real-process suites.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

from api.config import Settings
from api.inference import (
    ChatModelFile,
    EmbeddingCancelled,
    EngineRun,
    OneAtATime,
    PromptTooLong,
    TokenSink,
    read_model_metadata,
)
from api.sampling import SamplingParams

FAKE_REPLY_TOKENS: tuple[str, ...] = ("This", " is", " the", " fake", " engine", ".")
FAKE_REPLY = "".join(FAKE_REPLY_TOKENS)
FAKE_EMBEDDING_DIM = 8


def prompt_tokens(prompt: str) -> int:
    return len(prompt.encode())


class FakeChatEngine(OneAtATime):
    def __init__(self, path: Path, n_ctx: int) -> None:
        super().__init__()
        header = ChatModelFile.read(path, n_ctx)  # the real engine's window and template, from the file
        self.name = path.name
        self.context_length = header.context_length
        self.template = header.template
        self.fingerprint = header.fingerprint

    def count_tokens(self, prompt: str, *, cancel: threading.Event | None = None,
                     progress: Callable[[], None] | None = None) -> int:
        tokens = prompt_tokens(prompt)
        if tokens > self.context_length:
            raise PromptTooLong(f"the prompt is {tokens} tokens, more than the context window of {self.context_length}")
        return tokens

    def generate(self, prompt: str, sampling: SamplingParams, sink: TokenSink, *,
                 cancel: threading.Event | None = None, progress: Callable[[], None] | None = None,
                 prompt_read: Callable[[int], None] | None = None) -> EngineRun:
        read = self.count_tokens(prompt)
        if prompt_read:
            prompt_read(read)
        limit = sampling.max_tokens if sampling.max_tokens is not None else len(FAKE_REPLY_TOKENS)
        produced = 0
        for piece in FAKE_REPLY_TOKENS[:limit]:
            if cancel is not None and cancel.is_set():
                break
            produced += 1
            if progress:
                progress()
            if not sink(piece):
                break
        return EngineRun(prompt_tokens=read, completion_tokens=produced, prompt_seconds=0.0, total_seconds=0.0)


def fake_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [byte / 255 for byte in digest[:FAKE_EMBEDDING_DIM]]


class FakeEmbeddingEngine(OneAtATime):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.name = path.name

    def embed(self, texts: list[str], *, cancel: threading.Event | None = None,
              progress: Callable[[], None] | None = None) -> tuple[list[list[float]], int]:
        vectors = []
        for text in texts:
            if cancel is not None and cancel.is_set():
                raise EmbeddingCancelled("the embedding was cancelled")
            vectors.append(fake_vector(text))
            if progress:
                progress()
        return vectors, sum(prompt_tokens(text) for text in texts)


class FakeLoader:
    """runtime.EngineLoader on the fakes. A model file must have a readable GGUF header, as for the
    real engine (ModelLoadError otherwise); nothing past the header is read."""

    def chat(self, path: Path, settings: Settings, *, default: bool) -> FakeChatEngine:
        return FakeChatEngine(path, settings.n_ctx)

    def embedding(self, path: Path, settings: Settings) -> FakeEmbeddingEngine:
        read_model_metadata(path)
        return FakeEmbeddingEngine(path)
