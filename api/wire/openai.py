"""The OpenAI-compatible interface under /v1: chat completions, completions, models, embeddings,
and the extras of the earlier FastAPI-style GPT4All servers (engines, health, model retrieval,
prompt templates and their sampling fields on completions).

Shapes follow OpenAI's wire format exactly, because client libraries parse it strictly:
errors are `{"error": {message, type, param, code}}` with 4xx for bad input (SDKs retry 5xx);
a stream is `data: {json}` events with one stable id, the role in the first chat chunk, the
finish_reason in a chunk of its own, an optional usage chunk with no choices, then `[DONE]`.
Request bodies are validated by the models in api/wire/schemas.py, which also document them.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from api.errors import ApiError, InvalidRequest, ModelNotFound
from api.generation import Generation, GenerationRequest, Outcome
from api.model_download import DISABLED_MESSAGE, DownloadDisabled
from api.model_names import InstalledModel, ModelNameError, file_name_for, model_id
from api.sampling import SamplingParams
from api.wire import schemas
from api.wire.common import client_disconnected, downloader, json_body, runtime, sampling_from, sse_event, sse_response, stop_strings
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("openai", __name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TAGS_CHAT = ("OpenAI: chat and completions",)
TAGS_MODELS = ("OpenAI: models and embeddings",)


# -- request checks the schema cannot express


def _reject_unsupported(body: schemas.OpenAISampling) -> None:
    for name, reason in (("tools", "tool calling"), ("functions", "function calling"), ("tool_choice", "tool calling"),
                         ("function_call", "function calling")):
        if getattr(body, name) not in (None, [], {}):
            raise InvalidRequest(f"'{name}': {reason} is not supported by this server", param=name)
    if body.logprobs not in (None, False, 0):
        raise InvalidRequest("'logprobs': log probabilities are not supported by this server", param="logprobs")
    if body.response_format not in (None, {}) and body.response_format.get("type") != "text":
        raise InvalidRequest("'response_format': only {\"type\": \"text\"} is supported", param="response_format")


def _repeat_penalty(body: schemas.OpenAISampling) -> float:
    """gpt4all has one multiplicative penalty on tokens seen in the last repeat_last_n tokens.

    `repeat_penalty` (or its old misspelling `repeat_penality`) sets it directly. OpenAI's
    presence_penalty (0..2) is the closest idea and maps to 1 + presence_penalty / 2;
    frequency_penalty (a count-based penalty) has no equivalent, so a non-zero value is refused
    rather than silently ignored.
    """
    if body.frequency_penalty != 0:
        raise InvalidRequest("'frequency_penalty' is not supported (only 0); use presence_penalty or repeat_penalty",
                             param="frequency_penalty")
    repeat = body.repeat_penalty
    if body.repeat_penality is not None:
        if repeat is not None:  # even when equal: the document can say "not both", not "not different"
            raise InvalidRequest("set either 'repeat_penalty' or 'repeat_penality' (its old spelling), not both",
                                 param="repeat_penality")
        repeat = body.repeat_penality
    if repeat is not None and body.presence_penalty:
        raise InvalidRequest("set either 'repeat_penalty' or 'presence_penalty', not both", param="repeat_penalty")
    return repeat if repeat is not None else 1.0 + body.presence_penalty / 2


def parse_sampling(body: schemas.OpenAISampling) -> SamplingParams:
    return sampling_from(body, max_tokens=body.max_completion_tokens or body.max_tokens,
                         repeat_penalty=_repeat_penalty(body))


def _message_content(message: schemas.ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise InvalidRequest(f"messages[{index}].content must be a string or an array of text parts",
                             param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def parse_messages(body: schemas.ChatCompletionRequest) -> list[dict[str, str]]:
    return [{"role": ROLES[message.role], "content": _message_content(message, index)}
            for index, message in enumerate(body.messages)]


def _include_usage(body: schemas.OpenAISampling) -> bool:
    if body.stream_options is None:
        return False
    if not body.stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return body.stream_options.include_usage


def apply_prompt_template(template: str, prompt: str) -> str:
    """GPT4All's prompt templates: %1 stands for the prompt; %2, where the reply goes, may end it."""
    head, marker, tail = template.partition("%2")
    if head.count("%1") != 1 or (marker and tail.strip()):
        raise InvalidRequest("'prompt_template' must contain %1 (where the prompt goes) exactly once, and %2 (where the "
                             "reply goes) at most once, at its end", param="prompt_template")
    return head.replace("%1", prompt)


# -- responses


def _usage(outcomes: list[Outcome]) -> dict[str, int]:
    prompt = sum(outcome.prompt_tokens for outcome in outcomes)
    completion = sum(outcome.completion_tokens for outcome in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Run:
    """The n generations of one request, started one after the other on the same model."""

    def __init__(self, request: GenerationRequest, n: int) -> None:
        self.request = request
        self.n = n
        self.outcomes: list[Outcome] = []
        # Held here: a stream starts the later generations after the view has returned, outside the
        # app context where runtime() works.
        self.service = runtime().service
        self.first = self.service.start(request)  # errors before any output surface here
        self.id = self.first.id
        self.created = self.first.created
        self.model = model_id(self.first.model_name)

    def generations(self) -> Iterator[tuple[int, Generation]]:
        for index in range(self.n):
            generation = self.first if index == 0 else self.service.start(self.request)
            yield index, generation
            generation.close()
            if generation.outcome is not None:
                self.outcomes.append(generation.outcome)


def _stream(run: _Run, include_usage: bool, chunk: Callable[[int, str | None, str | None, bool], dict[str, Any]]) -> Response:
    """Stream the run as SSE; `chunk(index, text, finish_reason, first)` builds one event's payload."""

    def events() -> Iterator[str]:
        current: Generation | None = None
        try:
            for index, generation in run.generations():
                current = generation
                yield sse_event(chunk(index, None, None, True))
                for piece in generation:
                    yield sse_event(chunk(index, piece, None, False))
                assert generation.outcome is not None
                yield sse_event(chunk(index, None, generation.outcome.finish_reason, False))
            if include_usage:
                yield sse_event({"id": run.id, "object": chunk(0, None, None, False)["object"], "created": run.created,
                                 "model": run.model, "choices": [], "usage": _usage(run.outcomes)})
            yield "data: [DONE]\n\n"
        except ApiError as error:  # headers are gone: report in-band, as OpenAI does
            yield sse_event(error.to_dict())
        finally:
            if current is not None:
                current.close()

    return sse_response(events())


def _chat_chunk(run: _Run, include_usage: bool) -> Callable[[int, str | None, str | None, bool], dict[str, Any]]:
    def chunk(index: int, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        if first:
            delta: dict[str, str] = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        else:
            delta = {}
        payload: dict[str, Any] = {
            "id": run.id, "object": "chat.completion.chunk", "created": run.created, "model": run.model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    return chunk


def _chat_request(body: schemas.ChatCompletionRequest) -> GenerationRequest:
    return GenerationRequest(
        sampling=parse_sampling(body),
        model=body.model,
        messages=parse_messages(body),
        stop=stop_strings(body.stop),
        is_disconnected=client_disconnected(),
    )


@blueprint.post("/chat/completions")
@blueprint.post("/chat/completions/")
@documented(
    "Chat completion (OpenAI)", tags=TAGS_CHAT, request=schemas.ChatCompletionRequest,
    description="The messages go through the model's own chat template. Trailing-slash form accepted without a redirect.",
    responses={200: (Reply("The reply (stream: false).", schemas.ChatCompletion),
                     Reply("Server-Sent Events (stream: true): `data: {chunk}` events, then `data: [DONE]`.",
                           media_type="text/event-stream", events=schemas.ChatCompletionChunk | schemas.ErrorResponse))},
    errors=GENERATION_ERRORS,
)
def chat_completions() -> Response:
    body = parse(schemas.ChatCompletionRequest, json_body())
    _reject_unsupported(body)
    include_usage = _include_usage(body)
    run = _Run(_chat_request(body), body.n)
    run.id = "chatcmpl-" + run.id
    if body.stream:
        return _stream(run, include_usage, _chat_chunk(run, include_usage))
    choices = []
    for index, generation in run.generations():
        text = generation.text()
        assert generation.outcome is not None
        choices.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": generation.outcome.finish_reason})
    return jsonify({"id": run.id, "object": "chat.completion", "created": run.created, "model": run.model,
                    "choices": choices, "usage": _usage(run.outcomes), "system_fingerprint": None})


def _completion_prompt(body: schemas.CompletionRequest) -> str:
    """The one prompt (the schema allows a string or a list of exactly one, never empty)."""
    return body.prompt[0] if isinstance(body.prompt, list) else body.prompt


def _completion_chunk(run: _Run, include_usage: bool, echo: str) -> Callable[[int, str | None, str | None, bool], dict[str, Any]]:
    def chunk(index: int, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
            "choices": [{"index": index, "text": echo if first else (text or ""), "logprobs": None,
                         "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    return chunk


@blueprint.post("/completions")
@blueprint.post("/completions/")
@documented(
    "Text completion (OpenAI, with GPT4All's prompt templates)", tags=TAGS_CHAT, request=schemas.CompletionRequest,
    description="The prompt is continued as it is, or wrapped in `prompt_template` first (%1 stands for the prompt). "
                "Also takes the GPT4ALL-Python-API fields prompt_batch_size, repeat_penality, repeat_last_n and reload. "
                "Trailing-slash form accepted without a redirect.",
    responses={200: (Reply("The completion (stream: false).", schemas.Completion),
                     Reply("Server-Sent Events (stream: true): `data: {chunk}` events, then `data: [DONE]`.",
                           media_type="text/event-stream", events=schemas.Completion | schemas.ErrorResponse))},
    errors=GENERATION_ERRORS,
)
def completions() -> Response:
    body = parse(schemas.CompletionRequest, json_body())
    _reject_unsupported(body)
    if body.suffix:
        raise InvalidRequest("'suffix': suffix (insertion) is not supported by this server", param="suffix")
    include_usage = _include_usage(body)
    prompt = _completion_prompt(body)
    run = _Run(GenerationRequest(
        sampling=parse_sampling(body),
        model=body.model,
        prompt=apply_prompt_template(body.prompt_template, prompt) if body.prompt_template is not None else prompt,
        stop=stop_strings(body.stop),
        is_disconnected=client_disconnected(),
    ), body.n)
    run.id = "cmpl-" + run.id
    prefix = prompt if body.echo else ""
    if body.stream:
        return _stream(run, include_usage, _completion_chunk(run, include_usage, prefix))
    choices = []
    for index, generation in run.generations():
        text = prefix + generation.text()
        assert generation.outcome is not None
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": generation.outcome.finish_reason})
    return jsonify({"id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
                    "choices": choices, "usage": _usage(run.outcomes), "system_fingerprint": None})


# -- models and engines


def _model_object(model: InstalledModel, note: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"id": model.id, "object": "model", "created": model.created, "owned_by": "local"}
    if note:
        body["data"] = note
    return body


@blueprint.get("/models")
@documented("List the installed models", tags=TAGS_MODELS, responses={200: Reply("The installed models.", schemas.ModelList)})
def list_models() -> Response:
    return jsonify({"object": "list", "data": [_model_object(model) for model in runtime().models.installed()]})


def _installed(name: str | None) -> InstalledModel | None:
    return next((model for model in runtime().models.installed() if model.file_name == name), None)


@blueprint.get("/models/<path:model>")
@documented(
    "Describe a model; retrieve it first if it is not installed", tags=TAGS_MODELS,
    description="An installed model is described at once. A model that is not installed is downloaded from the model "
                "catalog when ALLOW_DOWNLOAD=true (as GPT4ALL-Python-API did), then described; `data` says what happened.",
    responses={200: Reply("The model.", schemas.ModelObject)},
    errors={404: "Not installed, and downloads are disabled or the catalog does not list it.",
            502: "The download failed (truncated, wrong checksum, server error).", 504: "The download server stopped answering.",
            507: "Not enough disk space."},
    path_params={"model": "A model id or .gguf file name."},
)
def retrieve_model(model: str) -> Response:
    requested = model  # the client's spelling, for messages
    models = runtime().models
    try:
        name: str | None = file_name_for(requested)
    except ModelNameError:
        name = None
    found = _installed(name)
    if found is not None:
        return jsonify(_model_object(found))
    available = ", ".join(models.available_ids()) or "none"
    missing = f"The model '{requested}' does not exist. Available models: {available}"
    if name is None:
        raise ModelNotFound(missing, param="model")
    try:
        retrieval = downloader().retrieve(name)
    except DownloadDisabled:
        raise ModelNotFound(f"{missing}. It cannot be retrieved: {DISABLED_MESSAGE}.", param="model") from None
    found = _installed(retrieval.path.name)
    if found is None:
        raise ModelNotFound(f"the model '{requested}' was retrieved but is not a readable GGUF model", param="model")
    return jsonify(_model_object(found, retrieval.message))


def _engine(model: InstalledModel) -> dict[str, object]:
    return {"id": model.id, "object": "engine", "created": model.created, "owner": "local", "ready": True}


@blueprint.get("/engines")
@blueprint.get("/engines/")
@documented("List the engines (OpenAI's older name for models)", tags=TAGS_MODELS,
            responses={200: Reply("One engine per installed model.", schemas.EngineList)})
def list_engines() -> Response:
    return jsonify({"object": "list", "data": [_engine(model) for model in runtime().models.installed()]})


@blueprint.get("/engines/<path:engine_id>")
@documented("Describe an engine (an installed model)", tags=TAGS_MODELS, responses={200: Reply("The engine.", schemas.Engine)},
            errors={404: "No such model is installed."}, path_params={"engine_id": "A model id or .gguf file name."})
def retrieve_engine(engine_id: str) -> Response:
    try:
        found = _installed(file_name_for(engine_id))
    except ModelNameError:
        found = None
    if found is None:
        available = ", ".join(runtime().models.available_ids()) or "none"
        raise ModelNotFound(f"The engine '{engine_id}' does not exist. Available engines: {available}", param="engine_id")
    return jsonify(_engine(found))


@blueprint.get("/health")
@blueprint.get("/health/")
@documented("Health check of the FastAPI GPT4All server (no API key needed)", tags=("Health",),
            responses={200: Reply("Ready.", schemas.HealthStatus),
                       503: Reply("The model is loading (or failed to load).", schemas.HealthStatus,
                                  headers={"Retry-After": "Seconds to wait."})})
def health() -> Response:
    state = runtime()
    if state.ready:
        return jsonify({"status": "ok"})
    response = jsonify({"status": "failed" if state.failure else "loading"})
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


# -- embeddings


def _embedding_inputs(body: schemas.EmbeddingRequest) -> list[str]:
    return [body.input] if isinstance(body.input, str) else body.input  # the schema refuses empty texts


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@blueprint.post("/embeddings")
@blueprint.post("/embeddings/")
@documented("Embeddings (OpenAI)", tags=TAGS_MODELS, request=schemas.EmbeddingRequest,
            responses={200: Reply("One vector per input text.", schemas.EmbeddingList)},
            errors={404: "Not the embedding model.", 503: "No embedding model is installed, or it is busy."})
def embeddings() -> Response:
    body = parse(schemas.EmbeddingRequest, json_body())
    texts = _embedding_inputs(body)
    state = runtime()
    model = state.models.embedding_model(body.model)
    vectors, tokens = state.service.embed(model, texts)
    if body.dimensions is not None and body.dimensions != len(vectors[0]):
        raise InvalidRequest(f"'dimensions' must be {len(vectors[0])} for this model (it cannot be shortened)",
                             param="dimensions")
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": _encode(vector, body.encoding_format)}
                 for index, vector in enumerate(vectors)],
        "model": model_id(model.name),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
