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
from pathlib import Path
from typing import Protocol

from api.chat_template import ChatTemplate
from api.gguf_file import GGUFFormatError, file_fingerprint, read_metadata
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


class OneAtATime:
    """A loaded model serves one call at a time: `acquire` before it, `release` after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, timeout: float) -> bool:
        """Reserve the model for one call; False if it stays busy for `timeout` seconds."""
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()


def read_model_metadata(path: Path) -> dict[str, object]:
    """The GGUF metadata of a model file an engine is about to load; ModelLoadError if it has none."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path.name} (in MODEL_PATH)")
    try:
        return read_metadata(path)
    except (GGUFFormatError, OSError) as error:
        raise ModelLoadError(f"{path.name}: {error}") from None


def trained_context(metadata: dict[str, object]) -> int | None:
    """The context window the model was trained with, if its metadata says."""
    trained = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return trained if isinstance(trained, int) else None


@dataclass(frozen=True)
class ChatModelFile:
    """What a chat engine takes from a model file's header: its window (N_CTX, at most the trained
    one), its own chat template, and the fingerprint its replies carry (system_fingerprint)."""

    context_length: int
    template: ChatTemplate
    fingerprint: str

    @classmethod
    def read(cls, path: Path, n_ctx: int) -> ChatModelFile:
        metadata = read_model_metadata(path)
        trained = trained_context(metadata)
        source = metadata.get("tokenizer.chat_template")
        template = ChatTemplate(source if isinstance(source, str) else None, bos_token=str(metadata.get("bos_token") or ""),
                                eos_token=str(metadata.get("eos_token") or ""))
        return cls(min(n_ctx, trained) if trained is not None else n_ctx, template, file_fingerprint(path))


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
