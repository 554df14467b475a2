"""OpenAI's chat completions and completions under /v1, with the extras of the earlier
FastAPI-style GPT4All servers (prompt templates and their sampling fields on completions).

Shapes follow OpenAI's wire format exactly, because client libraries parse it strictly:
errors are `{"error": {message, type, param, code}}` with 4xx for bad input (SDKs retry 5xx);
a stream is `data: {json}` events with one stable id, the role in the first chat chunk, the
finish_reason in a chunk of its own, an optional usage chunk with no choices, then `[DONE]`.
Request bodies are validated by the models in api/wire/schemas.py, which also document them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from api.errors import ApiError, InvalidRequest
from api.generation import Generation, GenerationRequest, Outcome
from api.model_names import model_id
from api.sampling import SamplingParams
from api.wire import schemas
from api.wire.common import client_disconnected, is_token_ids, json_body, runtime, sampling_from, sse_event, sse_response, stop_strings
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("openai_chat", __name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TAGS_CHAT = ("OpenAI: chat and completions",)


# -- request checks the schema cannot express


def _reject_unsupported(body: schemas.OpenAISampling) -> None:
    for name, reason in (("tools", "tool calling"), ("functions", "function calling"), ("tool_choice", "tool calling"),
                         ("function_call", "function calling")):
        if getattr(body, name) not in schemas.NO_TOOL_USE:
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
    """The generations of one request: `n` for each of its requests (a completion's prompts, in
    order), started one after the other; choice `index` is request `index // n`'s reply number `index % n`."""

    def __init__(self, requests: list[GenerationRequest], n: int) -> None:
        self.requests = requests
        self.n = n
        self.outcomes: list[Outcome] = []
        # Held here: a stream starts the later generations after the view has returned, outside the
        # app context where runtime() works.
        self.service = runtime().service
        self.first = self.service.start(requests[0])  # errors before any output surface here
        self.id = self.first.id
        self.created = self.first.created
        self.model = model_id(self.first.model_name)
        self.fingerprint = self.first.model_fingerprint

    def generations(self) -> Iterator[tuple[int, Generation]]:
        for index in range(len(self.requests) * self.n):
            generation = self.first if index == 0 else self.service.start(self.requests[index // self.n])
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
                                 "model": run.model, "system_fingerprint": run.fingerprint, "choices": [],
                                 "usage": _usage(run.outcomes)})
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
            "system_fingerprint": run.fingerprint,
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
    run = _Run([_chat_request(body)], body.n)
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
                    "choices": choices, "usage": _usage(run.outcomes), "system_fingerprint": run.fingerprint})


def _completion_prompts(body: schemas.CompletionRequest) -> list[str]:
    """The prompts, each generated `n` times: a string is one; a list (a batch, as langchain's
    `OpenAI(...).batch()` sends) is bounded so that prompts x n stays within MAX_COMPLETION_CHOICES."""
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    limit = schemas.max_prompts(body.n)
    if len(prompts) > limit:
        raise InvalidRequest(f"'prompt': at most {limit} prompts with n={body.n} (at most "
                             f"{schemas.MAX_COMPLETION_CHOICES} choices in all, prompts times n)", param="prompt")
    return prompts


def _completion_chunk(run: _Run, include_usage: bool, echoes: list[str]) -> Callable[[int, str | None, str | None, bool], dict[str, Any]]:
    def chunk(index: int, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
            "system_fingerprint": run.fingerprint,
            "choices": [{"index": index, "text": echoes[index // run.n] if first else (text or ""), "logprobs": None,
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
    raw = json_body()
    if is_token_ids(raw.get("prompt")):
        raise InvalidRequest("'prompt': token ids are not supported, only text (the ids belong to the client's "
                             "tokenizer, not to this model's)", param="prompt", code="token_ids_not_supported")
    body = parse(schemas.CompletionRequest, raw)
    _reject_unsupported(body)
    if body.suffix:
        raise InvalidRequest("'suffix': suffix (insertion) is not supported by this server", param="suffix")
    include_usage = _include_usage(body)
    prompts = _completion_prompts(body)
    sampling, stop = parse_sampling(body), stop_strings(body.stop)
    run = _Run([GenerationRequest(
        sampling=sampling,
        model=body.model,
        prompt=apply_prompt_template(body.prompt_template, prompt) if body.prompt_template is not None else prompt,
        stop=stop,
        is_disconnected=client_disconnected(),
    ) for prompt in prompts], body.n)
    run.id = "cmpl-" + run.id
    echoes = prompts if body.echo else [""] * len(prompts)
    if body.stream:
        return _stream(run, include_usage, _completion_chunk(run, include_usage, echoes))
    choices = []
    for index, generation in run.generations():
        text = echoes[index // run.n] + generation.text()
        assert generation.outcome is not None
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": generation.outcome.finish_reason})
    return jsonify({"id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
                    "choices": choices, "usage": _usage(run.outcomes), "system_fingerprint": run.fingerprint})
