"""The generation service: one internal request type that every wire format translates into.

An adapter builds a `GenerationRequest`, calls `GenerationService.start()` and iterates the
returned `Generation` for text. The service renders the prompt, enforces the limits (request
time, stalls, stop strings, client disconnects) and tells the worker, through an
`InferenceObserver`, when inference begins, progresses and ends.

The model runs in a thread of its own that feeds a queue; the request thread reads the queue.
That keeps one code path for streamed and whole replies, and lets the request thread notice a
generation that stopped making progress even while gpt4all is stuck inside C code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from api.errors import ApiError, ContextLengthExceeded, EngineFailure, GenerationTimeout, InvalidRequest, ServiceUnavailable
from api.inference import ChatEngine, EmbeddingCancelled, EmbeddingEngine, EngineError, EngineRun, PromptTooLong
from api.inference_slots import InferenceSlots, Place, Release
from api.metrics import meters
from api.request_log import current_record
from api.sampling import SamplingParams, out_of_bounds

log = logging.getLogger("api.generation")

FinishReason = Literal["stop", "length"]
_DISCONNECT_POLL_SECONDS = 0.2


class InferenceObserver(Protocol):
    """What the worker process wants to know about inference (see api.worker)."""

    def inference_started(self, request: Any) -> None:
        """`request`: the worker's handle for the HTTP request this inference runs for (the request
        record's `worker_request`, opaque to the service), or None when there is none."""
        ...

    def progress(self) -> None: ...

    def inference_finished(self) -> None: ...


class NullObserver:
    def inference_started(self, request: Any) -> None:
        pass

    def progress(self) -> None:
        pass

    def inference_finished(self) -> None:
        pass


@dataclass(frozen=True)
class Limits:
    request_timeout: float
    stall_timeout: float
    default_max_tokens: int
    """The longest reply when a request does not say (DEFAULT_MAX_TOKENS)."""

    def overrun(self, what: str, started_at: float, last_sign_of_life: float, now: float,
                stalled: str) -> GenerationTimeout | None:
        """The 504 for a `what` (generation, embedding) running past REQUEST_TIMEOUT, or showing no
        sign of life for STALL_TIMEOUT; None while within both. `stalled` words the second case,
        with {} where the limit goes."""
        if now - started_at > self.request_timeout:
            return GenerationTimeout(f"the {what} ran longer than REQUEST_TIMEOUT ({self.request_timeout:g} s) and was stopped")
        if now - last_sign_of_life > self.stall_timeout:
            return GenerationTimeout(stalled.format(f"STALL_TIMEOUT ({self.stall_timeout:g} s)"))
        return None


@dataclass
class GenerationRequest:
    """One request for text, whichever wire format it came in."""

    sampling: SamplingParams
    model: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    prompt: str | None = None
    stop: tuple[str, ...] = ()
    is_disconnected: Callable[[], bool] = field(default=lambda: False)
    prompt_field: str = ""
    """The client's name for the field that carries the prompt, for errors about it (default:
    "messages" or "prompt", whichever is set)."""
    deadline: float | None = None
    """Seconds the whole request may take, waiting for a slot included (the deep health check);
    None: QUEUE_TIMEOUT for the wait, REQUEST_TIMEOUT for the generation."""

    @property
    def prompt_param(self) -> str:
        return self.prompt_field or ("messages" if self.messages is not None else "prompt")


@dataclass(frozen=True)
class Outcome:
    """Totals of a finished generation, for `usage`, `finish_reason` and timings."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    prompt_seconds: float
    total_seconds: float
    stop_sequence: str | None = None
    """The stop string that ended the reply, if one did (finish_reason is then "stop")."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_second(self) -> float:
        decode_seconds = self.total_seconds - self.prompt_seconds
        return self.completion_tokens / decode_seconds if decode_seconds > 0 else 0.0


class StopFilter:
    """Cuts the output at the first stop string, never letting part of one reach the client.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is one.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string found, once `stopped` (the first of them where several start at one place)."""

    def feed(self, text: str) -> str:
        """Return the text that is safe to send now."""
        if not self.stops:
            return text
        buffer = self.held + text
        hits = [(index, stop) for stop in self.stops if (index := buffer.find(stop)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            self.held = ""
            return buffer[:cut]
        keep = self._longest_partial_stop(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the generation, what was held back was not a stop string after all."""
        held, self.held = self.held, ""
        return held

    def _longest_partial_stop(self, buffer: str) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class Generation:
    """One running generation. Iterate it for text; then `outcome` holds the totals.

    Closing it early (a client that went away) cancels the generation at its next token.
    """

    def __init__(self, model: ChatEngine, prompt: str, request: GenerationRequest, limits: Limits,
                 observer: InferenceObserver, place: Place) -> None:
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.model_name = model.name
        self.model_fingerprint = model.fingerprint
        self.outcome: Outcome | None = None
        self._prompt_tokens: int | None = None
        self._model = model
        self._prompt = prompt
        self._request = request
        self._limits = limits
        self._observer = observer
        self._place = place
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._cancel = threading.Event()
        self._stop_filter = StopFilter(request.stop)
        self._pieces: Iterator[str] | None = None
        self._primed: list[str] = []
        self._record = current_record()
        self._arrived: float | None = self._record.started if self._record else time.perf_counter()

    # -- lifecycle

    def start(self) -> None:
        """Wait for the inference slot in line, reserve the model (ServiceUnavailable if it stays
        busy for REQUEST_TIMEOUT), and start generating. (Slot first, then the model, everywhere:
        the other order could deadlock two threads of one worker.)"""
        self._started_at = start_on_model(self._place, self._model, self._request, self._limits, self._observer,
                                          self._run, f"generation-{self.id[:8]}")
        self._pieces = self._read_pieces()

    def prime(self) -> None:
        """Wait for the first sign of life, so early errors (prompt too long) surface as statuses
        before any response header is sent."""
        assert self._pieces is not None, "start() first"
        with contextlib.suppress(StopIteration):
            self._primed.append(next(self._pieces))

    def __iter__(self) -> Iterator[str]:
        assert self._pieces is not None, "start() first"
        try:
            yield from self._primed
            self._primed.clear()
            yield from self._pieces
        finally:
            self.close()

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(self)

    def close(self) -> None:
        self._cancel.set()

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's token count, known once the first piece of text (or the end) has arrived:
        after `GenerationService.start()` returned, for a stream's opening event."""
        if self.outcome is not None:
            return self.outcome.prompt_tokens
        return self._prompt_tokens

    # -- the model's thread

    def _run(self, release_slot: Release) -> None:
        try:
            run = self._model.generate(
                self._prompt, self._request.sampling, self._on_text,
                cancel=self._cancel, progress=self._observer.progress,
                prompt_read=lambda tokens: self._events.put(("prompt", tokens)),
            )
            self._events.put(("end", run))
        except PromptTooLong as error:
            self._events.put(("error", ContextLengthExceeded(str(error), param=self._request.prompt_param)))
        except EngineError as error:
            self._events.put(("error", EngineFailure(str(error))))
        except Exception as error:
            self._events.put(("error", EngineFailure(f"generation failed: {type(error).__name__}")))
        finally:
            release_slot()
            self._model.release()
            self._observer.inference_finished()

    def _on_text(self, text: str) -> bool:
        self._events.put(("text", text))
        return True

    # -- the request's thread

    def _read_pieces(self) -> Iterator[str]:
        while True:
            kind, value = self._next_event()
            if kind == "prompt":
                assert isinstance(value, int)
                self._prompt_tokens = value
            elif kind == "text":
                if self._stop_filter.stopped:
                    continue  # tokens already in flight when the stop string matched
                piece = self._stop_filter.feed(str(value))
                if piece:
                    self._note_first_token()
                    yield piece
                if self._stop_filter.stopped:
                    self._cancel.set()
            elif kind == "error":
                assert isinstance(value, ApiError)
                raise value
            else:
                assert isinstance(value, EngineRun)
                if not self._stop_filter.stopped:
                    rest = self._stop_filter.flush()
                    if rest:
                        yield rest
                self.outcome = self._outcome(value)
                note_tokens(self.model_name, self.outcome.prompt_tokens, self.outcome.completion_tokens)
                return

    def _note_first_token(self) -> None:
        if self._arrived is None:
            return
        seconds, self._arrived = time.perf_counter() - self._arrived, None
        meters().first_token_seconds.observe(seconds)
        if self._record is not None:
            self._record.first_token_seconds = seconds

    def _next_event(self) -> tuple[str, object]:
        """The next event from the model's thread, enforcing the time limits meanwhile."""
        last_event_at = time.monotonic()
        while True:
            now = time.monotonic()
            if not self._cancel.is_set() and self._request.is_disconnected():
                self._cancel.set()  # nobody is listening: stop at the next token
            overrun = self._limits.overrun("generation", self._started_at, last_event_at, now,
                                           "the model produced nothing for {}; the generation was stopped")
            if overrun is not None:
                self._cancel.set()
                raise overrun
            try:
                return self._events.get(timeout=_DISCONNECT_POLL_SECONDS)
            except queue.Empty:
                continue

    def _outcome(self, run: EngineRun) -> Outcome:
        limit = self._request.sampling.max_tokens  # resolved by the service before the start
        hit_length = limit is not None and run.completion_tokens >= limit and not self._stop_filter.stopped
        return Outcome(
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            finish_reason="length" if hit_length else "stop",
            prompt_seconds=run.prompt_seconds,
            total_seconds=run.total_seconds,
            stop_sequence=self._stop_filter.matched,
        )


class Embedding:
    """One embedding request, run like a generation: in a thread of its own, reporting progress
    after each group of inputs, while the request thread enforces REQUEST_TIMEOUT and STALL_TIMEOUT.
    So the client gets a 504 in time even while gpt4all is inside one long call, never an empty
    reply from a worker killed as hung."""

    def __init__(self, model: EmbeddingEngine, texts: list[str], limits: Limits, observer: InferenceObserver,
                 place: Place, is_disconnected: Callable[[], bool]) -> None:
        self._model = model
        self._texts = texts
        self._limits = limits
        self._observer = observer
        self._place = place
        self._is_disconnected = is_disconnected
        self._cancel = threading.Event()
        self._result: queue.Queue[tuple[list[list[float]], int] | ApiError] = queue.Queue()
        self._started_at = self._last_progress_at = time.monotonic()

    def run(self) -> tuple[list[list[float]], int]:
        request = GenerationRequest(SamplingParams(), is_disconnected=self._is_disconnected)
        self._started_at = self._last_progress_at = start_on_model(
            self._place, self._model, request, self._limits, self._observer, self._work, "embedding")
        return self._wait()

    # -- the model's thread

    def _work(self, release_slot: Release) -> None:
        outcome: tuple[list[list[float]], int] | ApiError | None = None
        try:
            outcome = self._model.embed(self._texts, cancel=self._cancel, progress=self._progress)
        except EmbeddingCancelled:
            pass  # the request thread gave up on it and has answered already
        except EngineError as error:
            outcome = EngineFailure(str(error))
        except Exception as error:
            outcome = EngineFailure(f"embedding failed: {type(error).__name__}")
        finally:
            release_slot()
            self._model.release()
            self._observer.inference_finished()
        if outcome is not None:
            self._result.put(outcome)  # after the release: the model is free once the answer goes out

    def _progress(self) -> None:
        self._last_progress_at = time.monotonic()
        self._observer.progress()

    # -- the request's thread

    def _wait(self) -> tuple[list[list[float]], int]:
        while True:
            self._enforce_limits(time.monotonic())
            try:
                outcome = self._result.get(timeout=_DISCONNECT_POLL_SECONDS)
            except queue.Empty:
                continue
            if isinstance(outcome, ApiError):
                raise outcome
            return outcome

    def _enforce_limits(self, now: float) -> None:
        overrun = self._limits.overrun("embedding", self._started_at, self._last_progress_at, now,
                                       "the embedding made no progress for {} and was stopped "
                                       "(a very long single input may need a higher STALL_TIMEOUT)")
        if overrun is not None:
            self._cancel.set()
            raise overrun


class ModelResolver(Protocol):
    def chat_model(self, requested: str | None) -> ChatEngine: ...


class GenerationService:
    """Turns a GenerationRequest into a running Generation on the right model."""

    def __init__(self, models: ModelResolver, limits: Limits, observer: InferenceObserver | None = None,
                 slots: InferenceSlots | None = None) -> None:
        self.models = models
        self.limits = limits
        self.observer = observer or NullObserver()
        self.slots = slots or InferenceSlots(None, 0)

    def render_prompt(self, model: ChatEngine, request: GenerationRequest) -> str:
        if request.messages is not None:
            return model.template.render(request.messages, add_generation_prompt=True)
        if request.prompt is None:
            raise InvalidRequest("a prompt or messages are required", param="prompt")
        return request.prompt

    def embed(self, model: EmbeddingEngine, texts: list[str], field: str = "input",
              is_disconnected: Callable[[], bool] = lambda: False) -> tuple[list[list[float]], int]:
        """Embed texts (`field` is the client's name for them); this touches a model, so the
        worker counts it like a generation."""
        if any(not text for text in texts):
            raise InvalidRequest(f"'{field}' must not contain empty strings", param=field)
        place = self.slots.admit()
        try:
            vectors, tokens = Embedding(model, texts, self.limits, self.observer, place, is_disconnected).run()
        finally:
            place.cancel()
        note_tokens(model.name, tokens, 0)
        return vectors, tokens

    def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens the request's prompt is for its model: the `prompt_tokens` a generation
        of it would report. The engine evaluates the prompt to count it (see ChatEngine.count_tokens),
        so the worker counts this like a generation."""
        place = self.slots.admit()
        try:
            model = self.models.chat_model(request.model)
            prompt = self.render_prompt(model, request)
            release_slot = take_slot_then_model(place, model, request, self.limits)
        finally:
            place.cancel()
        try:
            self.observer.inference_started(worker_request())
            try:
                return model.count_tokens(prompt, progress=self.observer.progress)
            except PromptTooLong as error:
                raise ContextLengthExceeded(str(error), param=request.prompt_param) from None
            except EngineError as error:
                raise EngineFailure(str(error)) from None
            finally:
                self.observer.inference_finished()
        finally:
            release_slot()
            model.release()

    def start(self, request: GenerationRequest) -> Generation:
        """Validate, render and start; errors that need no model run are raised here."""
        request = dataclasses.replace(
            request, sampling=check_sampling(request.sampling.with_default_max_tokens(self.limits.default_max_tokens)))
        if log.isEnabledFor(logging.DEBUG):  # built only for DEBUG=true: this runs on every request
            log.debug("sampling: %s", " ".join(f"{name}={value:g}" for name, value in dataclasses.asdict(request.sampling).items()))
        limits = self.limits if request.deadline is None else dataclasses.replace(
            self.limits, request_timeout=min(self.limits.request_timeout, request.deadline),
            stall_timeout=min(self.limits.stall_timeout, request.deadline))
        place = self.slots.admit()  # a full line is a 503 now, before any prompt work
        try:
            model = self.models.chat_model(request.model)
            prompt = self.render_prompt(model, request)
            generation = Generation(model, prompt, request, limits, self.observer, place)
            generation.start()
        finally:
            place.cancel()  # nothing left to give up once the generation holds the slot
        generation.prime()
        return generation


def note_tokens(model: str, prompt: int, completion: int) -> None:
    """Tokens for /metrics and for the request's access-log line."""
    meters().prompt_tokens.labels(model).inc(prompt)
    if completion:
        meters().generated_tokens.labels(model).inc(completion)
    record = current_record()
    if record is not None:
        record.prompt_tokens += prompt
        record.completion_tokens += completion


def worker_request() -> object:
    """The worker's handle for the request being served (RequestRecord.worker_request), or None."""
    record = current_record()
    return record.worker_request if record is not None else None


def note_queue_wait(seconds: float) -> None:
    meters().queue_seconds.observe(seconds)
    record = current_record()
    if record is not None:
        record.queue_seconds = (record.queue_seconds or 0.0) + seconds


def take_slot_then_model(place: Place, model: ChatEngine | EmbeddingEngine, request: GenerationRequest,
                         limits: Limits) -> Release:
    """Wait in line for the inference slot (the request's deadline, else QUEUE_TIMEOUT), then
    reserve the model; the returned function gives the slot back (the caller releases the model)."""
    waited_from = time.perf_counter()
    release_slot = place.wait(request.is_disconnected, timeout=request.deadline)
    note_queue_wait(time.perf_counter() - waited_from)
    if not model.acquire(timeout=limits.request_timeout):
        release_slot()
        raise ServiceUnavailable("the model is busy with another request; try again", retry_after=2)
    return release_slot


def start_on_model(place: Place, model: ChatEngine | EmbeddingEngine, request: GenerationRequest, limits: Limits,
                   observer: InferenceObserver, work: Callable[[Release], None], name: str) -> float:
    """Take the slot, then the model (take_slot_then_model), and run `work(release_slot)` in a thread
    of its own, which gives both back when it ends. Returns when the model was taken: time in line
    does not count towards REQUEST_TIMEOUT."""
    release_slot = take_slot_then_model(place, model, request, limits)
    try:
        taken_at = time.monotonic()
        observer.inference_started(worker_request())
        threading.Thread(target=work, args=(release_slot,), name=name, daemon=True).start()
    except BaseException:
        release_slot()  # the thread that would have given both back never ran
        model.release()
        raise
    return taken_at


def check_sampling(sampling: SamplingParams) -> SamplingParams:
    """The service's own guard on sampling values (400 if out of range): the ranges of
    api/sampling.py, which the wire formats also declare, catching whatever an adapter derives or
    forgets to declare before the engine gets it."""
    failed = out_of_bounds(sampling)
    if failed is not None:
        name, bound = failed
        raise InvalidRequest(f"'{name}' must be {bound.expected}", param=name)
    return sampling
