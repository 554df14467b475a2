"""The OpenAI-compatible interface under /v1: chat completions, completions, models, embeddings.

Shapes follow OpenAI's wire format exactly, because client libraries parse it strictly:
errors are `{"error": {message, type, param, code}}` with 4xx for bad input (SDKs retry 5xx);
a stream is `data: {json}` events with one stable id, the role in the first chat chunk, the
finish_reason in a chunk of its own, an optional usage chunk with no choices, then `[DONE]`.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from api.engine import SamplingParams
from api.errors import ApiError, InvalidRequest, ModelNotFound
from api.generation import Generation, GenerationRequest, Outcome, check_sampling
from api.model_names import InstalledModel, ModelNameError, file_name_for, model_id
from api.wire.common import (
    client_disconnected,
    get_field,
    get_stop,
    get_text,
    json_body,
    runtime,
    sse_event,
    sse_response,
)

blueprint = Blueprint("openai", __name__)

DEFAULT_TEMPERATURE = 0.7
MAX_CHOICES = 8
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "suffix": "suffix (insertion) is not supported",
}


# -- request parsing


def _reject_unsupported(body: dict[str, Any]) -> None:
    for name, reason in UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}):
            raise InvalidRequest(f"'{name}': {reason} by this server", param=name)
    if body.get("logprobs") not in (None, False, 0):
        raise InvalidRequest("'logprobs': log probabilities are not supported by this server", param="logprobs")
    response_format = body.get("response_format")
    if response_format not in (None, {}) and not (isinstance(response_format, dict) and response_format.get("type") == "text"):
        raise InvalidRequest("'response_format': only {\"type\": \"text\"} is supported", param="response_format")


def _repeat_penalty(body: dict[str, Any]) -> float:
    """gpt4all has one multiplicative penalty on tokens seen in the last repeat_last_n tokens.

    `repeat_penalty` sets it directly. OpenAI's presence_penalty (0..2) is the closest idea and maps
    to 1 + presence_penalty / 2; frequency_penalty (a count-based penalty) has no equivalent, so a
    non-zero value is refused rather than silently ignored.
    """
    frequency = get_field(body, "frequency_penalty", float, 0.0)
    if frequency != 0:
        raise InvalidRequest("'frequency_penalty' is not supported (only 0); use presence_penalty or repeat_penalty",
                             param="frequency_penalty")
    presence = get_field(body, "presence_penalty", float, 0.0)
    if not 0 <= presence <= 2:
        raise InvalidRequest("'presence_penalty' must be between 0 and 2 (negative values are not supported)",
                             param="presence_penalty")
    repeat = get_field(body, "repeat_penalty", float)
    if repeat is not None and presence:
        raise InvalidRequest("set either 'repeat_penalty' or 'presence_penalty', not both", param="repeat_penalty")
    return repeat if repeat is not None else 1.0 + presence / 2


def _max_tokens(body: dict[str, Any], default: int) -> int:
    value = get_field(body, "max_completion_tokens", int)
    return value if value is not None else get_field(body, "max_tokens", int, default)


def parse_sampling(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    get_field(body, "seed", int)  # accepted, best effort: gpt4all cannot seed its sampler
    return check_sampling(SamplingParams(
        max_tokens=_max_tokens(body, default_max_tokens),
        temperature=get_field(body, "temperature", float, DEFAULT_TEMPERATURE),
        top_p=get_field(body, "top_p", float, 1.0),
        top_k=get_field(body, "top_k", int, 40),
        min_p=get_field(body, "min_p", float, 0.0),
        repeat_penalty=_repeat_penalty(body),
        repeat_last_n=get_field(body, "repeat_last_n", int, 64),
    ))


def _choice_count(body: dict[str, Any]) -> int:
    n = get_field(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_CHOICES}", param="n")
    return n


def _message_content(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{index}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                     "are supported", param=f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"messages[{index}].content must be a string or an array of text parts",
                         param=f"messages[{index}].content")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    raw = get_field(body, "messages", list, required=True)
    if not raw:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{index}].role must be one of system, developer, user, assistant",
                                 param=f"messages[{index}].role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        messages.append({"role": ROLES[role], "content": _message_content(content, index)})
    return messages


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = get_field(body, "stream_options", dict)
    if options is None:
        return False
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    return include


def _requested_model(body: dict[str, Any]) -> str | None:
    return get_text(body, "model")


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
        self.first = runtime().service.start(request)  # errors before any output surface here
        self.id = self.first.id
        self.created = self.first.created
        self.model = model_id(self.first.model_name)

    def generations(self) -> Iterator[tuple[int, Generation]]:
        for index in range(self.n):
            generation = self.first if index == 0 else runtime().service.start(self.request)
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


@blueprint.post("/chat/completions")
@blueprint.post("/chat/completions/")
def chat_completions() -> Response:
    body = json_body()
    _reject_unsupported(body)
    settings = runtime().settings
    stream = get_field(body, "stream", bool, False)
    include_usage = _stream_options(body, stream)
    n = _choice_count(body)
    run = _Run(GenerationRequest(
        sampling=parse_sampling(body, settings.default_max_tokens),
        model=_requested_model(body),
        messages=parse_messages(body),
        stop=get_stop(body),
        is_disconnected=client_disconnected(),
    ), n)
    run.id = "chatcmpl-" + run.id
    if stream:
        return _stream(run, include_usage, _chat_chunk(run, include_usage))
    choices = []
    for index, generation in run.generations():
        text = generation.text()
        assert generation.outcome is not None
        choices.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": generation.outcome.finish_reason})
    return jsonify({"id": run.id, "object": "chat.completion", "created": run.created, "model": run.model,
                    "choices": choices, "usage": _usage(run.outcomes), "system_fingerprint": None})


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = get_field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest("'prompt' must be a string or a list of one string (batches and token arrays "
                                 "are not supported)", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise InvalidRequest("'prompt' must not be empty", param="prompt")
    return prompt


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
def completions() -> Response:
    body = json_body()
    _reject_unsupported(body)
    settings = runtime().settings
    stream = get_field(body, "stream", bool, False)
    include_usage = _stream_options(body, stream)
    echo = get_field(body, "echo", bool, False)
    n = _choice_count(body)
    prompt = _completion_prompt(body)
    run = _Run(GenerationRequest(
        sampling=parse_sampling(body, settings.default_max_tokens),
        model=_requested_model(body),
        prompt=prompt,
        stop=get_stop(body),
        is_disconnected=client_disconnected(),
    ), n)
    run.id = "cmpl-" + run.id
    prefix = prompt if echo else ""
    if stream:
        return _stream(run, include_usage, _completion_chunk(run, include_usage, prefix))
    choices = []
    for index, generation in run.generations():
        text = prefix + generation.text()
        assert generation.outcome is not None
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": generation.outcome.finish_reason})
    return jsonify({"id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
                    "choices": choices, "usage": _usage(run.outcomes), "system_fingerprint": None})


# -- models


def _model_object(model: InstalledModel) -> dict[str, object]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": "local"}


@blueprint.get("/models")
def list_models() -> Response:
    return jsonify({"object": "list", "data": [_model_object(model) for model in runtime().models.installed()]})


@blueprint.get("/models/<path:requested>")
def retrieve_model(requested: str) -> Response:
    models = runtime().models
    try:
        name = file_name_for(requested)
    except ModelNameError:
        name = None
    found = next((model for model in models.installed() if model.file_name == name), None)
    if found is None:
        available = ", ".join(models.available_ids()) or "none"
        raise ModelNotFound(f"The model '{requested}' does not exist. Available models: {available}", param="model")
    return jsonify(_model_object(found))


# -- embeddings


def _embedding_inputs(body: dict[str, Any]) -> list[str]:
    value = get_field(body, "input", (str, list), required=True)
    texts = [value] if isinstance(value, str) else value
    if not texts or not all(isinstance(text, str) for text in texts):
        raise InvalidRequest("'input' must be a non-empty string or a non-empty array of strings "
                             "(token arrays are not supported)", param="input")
    if any(not text for text in texts):
        raise InvalidRequest("'input' must not contain empty strings", param="input")
    if len(texts) > 2048:
        raise InvalidRequest("'input' may hold at most 2048 texts", param="input")
    return texts


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@blueprint.post("/embeddings")
@blueprint.post("/embeddings/")
def embeddings() -> Response:
    body = json_body()
    texts = _embedding_inputs(body)
    encoding = get_field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    state = runtime()
    model = state.models.embedding_model(_requested_model(body))
    dimensions = get_field(body, "dimensions", int)
    vectors, tokens = state.service.embed(model, texts)
    if dimensions is not None and dimensions != len(vectors[0]):
        raise InvalidRequest(f"'dimensions' must be {len(vectors[0])} for this model (it cannot be shortened)",
                             param="dimensions")
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": _encode(vector, encoding)}
                 for index, vector in enumerate(vectors)],
        "model": model_id(model.name),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
