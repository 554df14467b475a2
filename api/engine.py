"""The engine: the only module that imports gpt4all, keeping the contract of api/inference.py.

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
from pathlib import Path

from gpt4all import GPT4All
from gpt4all import _pyllmodel as bindings

from api.inference import (
    ChatModelFile,
    EmbeddingCancelled,
    EngineError,
    EngineRun,
    ModelLoadError,
    OneAtATime,
    PromptTooLong,
    TokenSink,
    read_model_metadata,
    trained_context,
)
from api.sampling import SamplingParams

# gpt4all caps the prompt batch at 128; its generate() default of 8 costs 15-25% of first-token time.
PROMPT_BATCH = 128
_ERROR_TOKEN = -1
_INT32_MAX = 2**31 - 1


def _as_int32(count: int) -> int:
    """A count for one of llama.cpp's int32 fields. ctypes wraps a larger value silently: a
    max_tokens of 2**31 became -2**31 and the reply ended after one token. Clamped, "that many"
    still means "no limit short of the end of the text"."""
    return min(count, _INT32_MAX)


def _load(path: Path, *, n_ctx: int, n_threads: int, device: str) -> GPT4All:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path.name} (in MODEL_PATH)")
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


def _reported_error(message: str) -> EngineError:
    """The error the bindings reported as text through the token callback."""
    if "too long" in message or "context" in message.lower():
        return PromptTooLong(f"The prompt does not fit in the model's context window: {message.strip()}")
    return EngineError(f"The model reported an error: {message.strip()}")


class ChatModel(OneAtATime):
    """One loaded chat model; `generate` runs one generation at a time."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, device: str = "cpu") -> None:
        super().__init__()
        self.path = path
        self.name = path.name
        header = ChatModelFile.read(path, n_ctx)
        self.fingerprint = header.fingerprint
        self.context_length = header.context_length
        self.template = header.template
        loading_since = time.time()
        self._gpt4all = _load(path, n_ctx=self.context_length, n_threads=n_threads, device=device)
        self.loaded_between = (loading_since, time.time())  # the sampler was seeded from the clock in here
        self._llmodel = self._gpt4all.model
        self.device = self._gpt4all.device or "cpu"

    def close(self) -> None:
        with self._lock:
            self._gpt4all.close()

    def generate(
        self,
        prompt: str,
        sampling: SamplingParams,
        sink: TokenSink,
        *,
        cancel: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
        prompt_read: Callable[[int], None] | None = None,
    ) -> EngineRun:
        """Run one generation on a reserved model (see `acquire`), feeding text to `sink`.

        `cancel`, once set, stops the generation at the next prompt or generated token; `progress`
        is called for each of them (the heartbeat that tells a slow generation from a hung one).
        `prompt_read` gets the prompt's token count when the first token is generated.
        Raises PromptTooLong, or EngineError for any other error the bindings report.
        """
        cancel = cancel or threading.Event()
        progress = progress or (lambda: None)
        prompt_read = prompt_read or (lambda _tokens: None)
        prompt_tokens = 0
        completion_tokens = 0
        reported: list[str] = []
        started = time.perf_counter()
        first_token_at: float | None = None

        def on_prompt_token(_token_id: int) -> bool:
            nonlocal prompt_tokens
            prompt_tokens += 1
            progress()
            return not cancel.is_set()

        def on_text(token_id: int, text: str) -> bool:
            if token_id == _ERROR_TOKEN:
                reported.append(text)
                return False
            progress()
            return not cancel.is_set() and sink(text)

        decode = self._llmodel._callback_decoder(on_text)

        def on_raw_token(token_id: int, raw: bytes) -> bool:
            nonlocal completion_tokens, first_token_at
            if token_id != _ERROR_TOKEN:
                completion_tokens += 1
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    prompt_read(prompt_tokens)
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
            raise _reported_error(reported[0])
        finished = time.perf_counter()
        return EngineRun(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            prompt_seconds=(first_token_at or finished) - started,
            total_seconds=finished - started,
        )

    def count_tokens(self, prompt: str, *, cancel: threading.Event | None = None,
                     progress: Callable[[], None] | None = None) -> int:
        """How many tokens `prompt` is as this model reads it, on a reserved model (see `acquire`).

        gpt4all 2.8.2 has no tokenizer call: its C API offers llmodel_prompt and nothing that only
        tokenizes. So the prompt is evaluated as a generation's would be, with nothing generated
        after it (n_predict 0, and a sink that refuses any token all the same), and counted from the
        prompt callback: it costs a generation's prompt time and gives exactly the count that a
        generation of the same prompt reports.
        """
        nothing = SamplingParams(max_tokens=0, temperature=0)
        return self.generate(prompt, nothing, lambda _text: False, cancel=cancel, progress=progress).prompt_tokens

    def _set_sampling(self, sampling: SamplingParams) -> None:
        assert sampling.max_tokens is not None, "the service resolves the default before the engine runs"
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


EMBED_GROUP_CHARS = 2048
"""Inputs go to gpt4all in groups of about this much text, one call per group. A call reports
nothing until it returns (its cancel callback runs once, before any work, with the batch sizes),
so the end of each call is the progress heartbeat and the start of the next one the point where a
cancelled request stops. Short inputs still share a call: one call per input costs a few ms each."""


def _groups(texts: list[str], budget: int) -> list[list[str]]:
    """Consecutive inputs, about `budget` characters of them per group (a longer input alone)."""
    groups: list[list[str]] = []
    size = budget
    for text in texts:
        if size + len(text) > budget:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += len(text)
    return groups


class EmbeddingModel(OneAtATime):
    """One loaded embedding model (BERT-style GGUF), one call at a time."""

    def __init__(self, path: Path, *, n_threads: int, device: str = "cpu") -> None:
        super().__init__()
        self.path = path
        self.name = path.name
        self.context_length = trained_context(read_model_metadata(path)) or 512
        self._gpt4all = _load(path, n_ctx=self.context_length, n_threads=n_threads, device=device)

    def close(self) -> None:
        with self._lock:
            self._gpt4all.close()

    def embed(self, texts: list[str], *, cancel: threading.Event | None = None,
              progress: Callable[[], None] | None = None) -> tuple[list[list[float]], int]:
        """Return one vector per text (none empty: the service checks) and the number of tokens read,
        on a reserved model (see `acquire`).

        `progress` is called after each group of inputs (see EMBED_GROUP_CHARS); once `cancel` is
        set, no further group starts and EmbeddingCancelled is raised.
        """
        vectors: list[list[float]] = []
        tokens = 0
        for group in _groups(texts, EMBED_GROUP_CHARS):
            if cancel is not None and cancel.is_set():
                raise EmbeddingCancelled(f"{len(texts) - len(vectors)} of {len(texts)} inputs left")
            try:
                result = self._gpt4all.model.generate_embeddings(
                    group, prefix="", dimensionality=-1, do_mean=True, atlas=False, cancel_cb=None)
            except RuntimeError as error:
                raise EngineError(f"embedding failed: {error}") from None
            vectors.extend(result["embeddings"])
            tokens += int(result["n_prompt_tokens"])
            if progress is not None:
                progress()
        return vectors, tokens
