"""The engine: the only module that imports gpt4all.

It loads one model per instance and runs one generation at a time (two threads on one gpt4all
model crash the process). Everything the bindings get wrong for a server is corrected here:

- `allow_download=False` always: otherwise the constructor fetches the model catalog from the
  network, with no timeout, even for a local file.
- A model that "loads" but is not usable (truncated file, unknown pre-tokenizer) is caught with
  `llmodel_isModelLoaded` instead of silently answering "".
- Prompts go through `llmodel_prompt` with special tokens parsed (`generate()` reads a chat
  template's `<|im_start|>` as plain text), n_batch 128 and a fresh context each time.
- Errors the bindings report as text through the token callback (token id -1) become exceptions.
- Prompt and completion tokens are counted from the callbacks, so `usage` is real.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt4all import GPT4All
from gpt4all import _pyllmodel as bindings

from api.chat_template import ChatTemplate
from api.errors import ApiError, ContextLengthExceeded, EngineFailure, InvalidRequest, ServiceUnavailable
from api.gguf_file import GGUFFormatError, read_metadata

# gpt4all caps the prompt batch at 128; its generate() default of 8 costs 15-25% of first-token time.
PROMPT_BATCH = 128
_ERROR_TOKEN = -1
_INT32_MAX = 2**31 - 1


def _as_int32(count: int) -> int:
    """A count for one of llama.cpp's int32 fields. ctypes wraps a larger value silently: a
    max_tokens of 2**31 became -2**31 and the reply ended after one token. Clamped, "that many"
    still means "no limit short of the end of the text"."""
    return min(count, _INT32_MAX)


class ModelLoadError(Exception):
    """The model file exists but gpt4all cannot use it. str() is one line for the logs."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64


@dataclass(frozen=True)
class EngineRun:
    """What one generation consumed and produced, counted from the bindings' callbacks."""

    prompt_tokens: int
    completion_tokens: int
    cancelled: bool
    prompt_seconds: float
    total_seconds: float


TokenSink = Callable[[str], bool]
"""Receives each piece of generated text; returning False stops the generation."""


def _load(path: Path, *, n_ctx: int, n_threads: int, device: str) -> GPT4All:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        model = GPT4All(
            path.name, model_path=str(path.parent), allow_download=False,
            n_ctx=n_ctx, n_threads=n_threads, device=device, verbose=False,
        )
    except Exception as error:  # the bindings raise RuntimeError, ValueError and plain Exception
        raise ModelLoadError(f"{path.name}: {error}".splitlines()[0]) from None
    if not bindings.llmodel.llmodel_isModelLoaded(model.model.model):
        raise ModelLoadError(f"{path.name}: gpt4all could not load this model (corrupt, truncated or unsupported)")
    return model


def _read_model_metadata(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return read_metadata(path)
    except (GGUFFormatError, OSError) as error:
        raise ModelLoadError(f"{path.name}: {error}") from None


def _context_error(message: str) -> ApiError:
    if "too long" in message or "context" in message.lower():
        return ContextLengthExceeded(
            f"The prompt does not fit in the model's context window: {message.strip()}", param="messages")
    return EngineFailure(f"The model reported an error: {message.strip()}")


class ChatModel:
    """One loaded chat model; `generate` runs one generation at a time."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, device: str = "cpu") -> None:
        self.path = path
        self.name = path.name
        metadata = _read_model_metadata(path)
        trained = metadata.get(f"{metadata.get('general.architecture')}.context_length")
        self.context_length = min(n_ctx, int(trained)) if isinstance(trained, int) else n_ctx
        self.template = ChatTemplate(
            metadata.get("tokenizer.chat_template") if isinstance(metadata.get("tokenizer.chat_template"), str) else None,
            bos_token=str(metadata.get("bos_token") or ""),
            eos_token=str(metadata.get("eos_token") or ""),
        )
        loading_since = time.time()
        self._gpt4all = _load(path, n_ctx=self.context_length, n_threads=n_threads, device=device)
        self.loaded_between = (loading_since, time.time())  # the sampler was seeded from the clock in here
        self._llmodel = self._gpt4all.model
        self._lock = threading.Lock()
        self.device = self._gpt4all.device or "cpu"

    def close(self) -> None:
        with self._lock:
            self._gpt4all.close()

    def acquire(self, timeout: float) -> bool:
        """Reserve the model for one generation; False if it stays busy for `timeout` seconds."""
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()

    def generate(
        self,
        prompt: str,
        sampling: SamplingParams,
        sink: TokenSink,
        *,
        cancel: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
    ) -> EngineRun:
        """Run one generation on a reserved model (see `acquire`), feeding text to `sink`.

        `cancel`, once set, stops the generation at the next prompt or generated token; `progress`
        is called for each of them (the heartbeat that tells a slow generation from a hung one).
        Raises ContextLengthExceeded or EngineFailure when the bindings report an error.
        """
        cancel = cancel or threading.Event()
        progress = progress or (lambda: None)
        prompt_tokens = 0
        completion_tokens = 0
        cancelled = False
        reported: list[str] = []
        started = time.perf_counter()
        first_token_at: float | None = None

        def on_prompt_token(_token_id: int) -> bool:
            nonlocal prompt_tokens, cancelled
            prompt_tokens += 1
            progress()
            cancelled = cancelled or cancel.is_set()
            return not cancelled

        def on_text(token_id: int, text: str) -> bool:
            nonlocal cancelled
            if token_id == _ERROR_TOKEN:
                reported.append(text)
                return False
            progress()
            keep_going = not cancel.is_set() and sink(text)
            cancelled = cancelled or not keep_going
            return keep_going

        decode = self._llmodel._callback_decoder(on_text)

        def on_raw_token(token_id: int, raw: bytes) -> bool:
            nonlocal completion_tokens, first_token_at
            if token_id != _ERROR_TOKEN:
                completion_tokens += 1
                first_token_at = first_token_at or time.perf_counter()
                return decode(token_id, raw)
            return on_text(token_id, raw.decode("utf-8", errors="replace"))

        self._set_sampling(sampling)
        prompt_callback = bindings.PromptCallback(on_prompt_token)
        response_callback = bindings.ResponseCallback(on_raw_token)
        self._llmodel.buffer.clear()
        self._llmodel.buff_expecting_cont_bytes = 0
        bindings.llmodel.llmodel_prompt(
            self._llmodel.model, prompt.encode("utf-8"), b"%1%2", prompt_callback, response_callback,
            True, self._llmodel.context, True, ctypes.c_char_p(),
        )
        if reported:
            raise _context_error(reported[0])
        finished = time.perf_counter()
        return EngineRun(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cancelled=cancelled,
            prompt_seconds=(first_token_at or finished) - started,
            total_seconds=finished - started,
        )

    def _set_sampling(self, sampling: SamplingParams) -> None:
        greedy = sampling.temperature == 0
        self._llmodel._set_context(
            n_predict=_as_int32(sampling.max_tokens),
            top_k=1 if greedy else _as_int32(sampling.top_k),
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            n_batch=PROMPT_BATCH,
            repeat_penalty=sampling.repeat_penalty,
            repeat_last_n=_as_int32(sampling.repeat_last_n),
            reset_context=True,
        )
        self._llmodel.context.n_past = 0  # a fresh context for every request: nothing leaks between them

    def advance_sampler(self, draws: int) -> None:
        """Consume `draws` random numbers of the sampler by generating throwaway tokens.

        See api.sampler_seed: gpt4all seeds from the clock in whole seconds, so workers that load
        in the same second must each start from a different point of the random sequence.
        """
        one_draw = SamplingParams(max_tokens=1, temperature=1.0, top_k=0, top_p=1.0)
        with self._lock:
            for _ in range(draws):  # one token each: a longer run could end early on EOS, drawing less
                self.generate(" ", one_draw, lambda _text: True)


class EmbeddingModel:
    """One loaded embedding model (BERT-style GGUF), one call at a time."""

    def __init__(self, path: Path, *, n_threads: int, device: str = "cpu") -> None:
        self.path = path
        self.name = path.name
        metadata = _read_model_metadata(path)
        trained = metadata.get(f"{metadata.get('general.architecture')}.context_length")
        self.context_length = int(trained) if isinstance(trained, int) else 512
        self._gpt4all = _load(path, n_ctx=self.context_length, n_threads=n_threads, device=device)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._gpt4all.close()

    def embed(self, texts: list[str], timeout: float) -> tuple[list[list[float]], int]:
        """Return one vector per text and the number of tokens read."""
        if any(not text for text in texts):
            raise InvalidRequest("input must not contain empty strings", param="input")
        if not self._lock.acquire(timeout=timeout):
            raise ServiceUnavailable("the embedding model is busy; try again", retry_after=1)
        try:
            result = self._gpt4all.model.generate_embeddings(
                texts, prefix="", dimensionality=-1, do_mean=True, atlas=False, cancel_cb=None)
        except RuntimeError as error:
            raise EngineFailure(f"embedding failed: {error}") from None
        finally:
            self._lock.release()
        return result["embeddings"], int(result["n_prompt_tokens"])
