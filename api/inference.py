"""The contract between the generation service and an engine, with nothing of gpt4all in it.

api/engine.py implements `ChatEngine` and `EmbeddingEngine` on gpt4all; anything else that keeps
the contract (a test's fake, another backend) can stand in for it. Importing this module, and so
api/generation.py and every wire format, loads no engine: api/runtime.py imports the engine only
when it loads a model.

Engine errors say what went wrong in engine terms (the prompt is too long, the model is busy);
the generation service turns them into API errors that name the client's own field.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from api.chat_template import ChatTemplate
from api.sampling import SamplingParams


@dataclass(frozen=True)
class EngineRun:
    """What one generation consumed and produced, counted from the engine's callbacks."""

    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    total_seconds: float


TokenSink = Callable[[str], bool]
"""Receives each piece of generated text; returning False stops the generation."""


class EngineError(Exception):
    """The engine could not do what was asked. str() is one line, fit for a client and the log."""


class PromptTooLong(EngineError):
    """The prompt does not fit in the model's context window."""


class EmbeddingCancelled(EngineError):
    """The caller gave up on an embedding while inputs remained (its time ran out)."""


class ModelLoadError(EngineError):
    """The model file exists but the engine cannot use it."""


class ChatEngine(Protocol):
    """One loaded chat model that runs one generation at a time."""

    name: str
    fingerprint: str
    """A short stable id of the loaded file (api.gguf_file.file_fingerprint)."""
    context_length: int
    template: ChatTemplate

    def acquire(self, timeout: float) -> bool:
        """Reserve the model for one generation; False if it stays busy for `timeout` seconds."""
        ...

    def release(self) -> None: ...

    def generate(self, prompt: str, sampling: SamplingParams, sink: TokenSink, *,
                 cancel: threading.Event | None = None, progress: Callable[[], None] | None = None,
                 prompt_read: Callable[[int], None] | None = None) -> EngineRun:
        """Generate on a reserved model. `prompt_read` gets the prompt's token count once it has been
        read, before the first generated token. Raises PromptTooLong, or EngineError for anything else."""
        ...

    def count_tokens(self, prompt: str, *, cancel: threading.Event | None = None,
                     progress: Callable[[], None] | None = None) -> int:
        """The number of tokens `prompt` is for this model, on a reserved model; nothing is generated.
        Raises PromptTooLong when it does not fit in the context window, EngineError otherwise."""
        ...


class EmbeddingEngine(Protocol):
    """One loaded embedding model that runs one call at a time."""

    name: str

    def acquire(self, timeout: float) -> bool:
        """Reserve the model for one call; False if it stays busy for `timeout` seconds."""
        ...

    def release(self) -> None: ...

    def embed(self, texts: list[str], *, cancel: threading.Event | None = None,
              progress: Callable[[], None] | None = None) -> tuple[list[list[float]], int]:
        """One vector per (non-empty) text and the number of tokens read, on a reserved model.
        `progress` is called as work is done; once `cancel` is set, EmbeddingCancelled is raised."""
        ...
