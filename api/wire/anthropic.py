"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens (mounted under /v1).

A thin adapter: `system` and `messages` (string or text-block content) become chat messages for the
generation service, `max_tokens` (required), `stop_sequences`, `temperature`, `top_p` and `top_k`
its sampling. Shapes follow Anthropic's documentation:
- the reply is a `message` object with one text block, `stop_reason` end_turn, max_tokens or
  stop_sequence (and the `stop_sequence` met), and `usage` in input and output tokens;
- a stream is Server-Sent Events, each `event: <type>` + `data: {json}`: message_start,
  content_block_start, ping, one content_block_delta (text_delta) per piece, content_block_stop,
  message_delta (stop_reason and usage), message_stop; an error after the start is an `error` event;
- count_tokens answers `{"input_tokens": N}`, the prompt's tokens as /v1/messages counts them (the
  engine has to read the prompt to count it, so this runs the model like a generation);
- errors are `{"type": "error", "error": {"type", "message"}}` with Anthropic's type for each
  status, on every path under /v1/messages (api/app.py asks `owns` which shape a path gets).
The API key may come as `x-api-key`, as Anthropic's SDK sends it (api/access.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from api.errors import ApiError, InvalidRequest
from api.generation import Generation, GenerationRequest, Outcome
from api.model_names import model_id
from api.sampling import SamplingParams
from api.wire import anthropic_schemas as schemas
from api.wire import shapes
from api.wire.common import client_disconnected, closing, error_reply, json_body, runtime, sse_response, stop_strings
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("anthropic", __name__)

TAGS = ("Anthropic: messages",)
ERRORS = {
    404: "The model is not installed (not_found_error; the message lists the installed ones).",
    503: "The model is loading or busy (overloaded_error); retry after `Retry-After` seconds.",
    504: "The generation ran over REQUEST_TIMEOUT or stalled for STALL_TIMEOUT (timeout_error).",
}
assert ERRORS.keys() == GENERATION_ERRORS.keys(), "the same failures as every route that generates"


# -- errors in Anthropic's shape


owns = shapes.anthropic_owns
error_body = shapes.anthropic_error_body


def error_response(error: ApiError) -> Response:
    return error_reply(error, error_body(error))


# -- requests


def _reject_unsupported(body: schemas.Unsupported) -> None:
    """What this server cannot do is refused with a 400 that names the field, never silently ignored."""
    for name in ("tools", "mcp_servers"):
        if getattr(body, name):
            raise InvalidRequest(f"'{name}': tool use is not supported by this server", param=name)
    if body.tool_choice is not None and body.tool_choice.get("type") not in ("auto", "none"):
        raise InvalidRequest("'tool_choice': tool use is not supported by this server", param="tool_choice")
    if body.thinking is not None and body.thinking.get("type") != "disabled":
        raise InvalidRequest("'thinking': extended thinking is not supported by this server", param="thinking")
    if (body.output_config or {}).get("format") is not None:
        raise InvalidRequest("'output_config.format': structured output is not supported by this server",
                             param="output_config.format")


def _text(content: str | list[schemas.TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def parse_messages(body: schemas.CountTokensRequest) -> list[dict[str, str]]:
    last = len(body.messages) - 1
    if body.messages[last].role != "user":
        raise InvalidRequest(f"'messages[{last}].role': the conversation must end with a user message (continuing an "
                             "assistant message is not supported)", param=f"messages[{last}].role")
    system = [{"role": "system", "content": _text(body.system)}] if body.system is not None else []
    return [*system, *({"role": message.role, "content": _text(message.content)} for message in body.messages)]


def _generation_request(body: schemas.MessagesRequest) -> GenerationRequest:
    return GenerationRequest(
        sampling=SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k),
        model=body.model,
        messages=parse_messages(body),
        stop=stop_strings(body.stop_sequences),
        is_disconnected=client_disconnected(),
    )


# -- replies


def _stop_reason(outcome: Outcome) -> str:
    if outcome.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if outcome.stop_sequence is not None else "end_turn"


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def _message(generation: Generation, text: str | None) -> dict[str, Any]:
    """The message object: whole (after the generation), or as a stream's message_start announces it."""
    outcome = generation.outcome if text is not None else None
    return {
        "id": "msg_" + generation.id, "type": "message", "role": "assistant", "model": model_id(generation.model_name),
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": _stop_reason(outcome) if outcome else None,
        "stop_sequence": outcome.stop_sequence if outcome else None,
        "usage": _usage(generation.prompt_tokens or 0, outcome.completion_tokens if outcome else 0),
    }


def _event(kind: str, **fields: Any) -> str:
    """One event in Anthropic's framing: its type as the SSE event name, and in the JSON data."""
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


def _stream(generation: Generation) -> Iterator[str]:
    yield _event("message_start", message=_message(generation, None))
    yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    yield _event("ping")
    try:
        for piece in generation:
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
    except ApiError as error:  # headers are gone: report in-band, as Anthropic does
        yield _event("error", error=error_body(error)["error"])
        return
    outcome = generation.outcome
    assert outcome is not None
    yield _event("content_block_stop", index=0)
    yield _event("message_delta", delta={"stop_reason": _stop_reason(outcome), "stop_sequence": outcome.stop_sequence},
                 usage={"input_tokens": outcome.prompt_tokens, "output_tokens": outcome.completion_tokens})
    yield _event("message_stop")


@blueprint.post("/messages")
@documented(
    "Create a message (Anthropic Messages API)", tags=TAGS, request=schemas.MessagesRequest,
    description="`system` and `messages` go through the model's own chat template; the conversation must end with a "
                "user message. Tools, extended thinking and structured output are refused with a 400 naming the field.",
    responses={200: (Reply("The message (stream: false).", schemas.MessageReply),
                     Reply("Server-Sent Events (stream: true): `event: <type>` and `data: {event}`, from message_start "
                           "to message_stop.", media_type="text/event-stream", events=schemas.StreamEvent))},
    errors=ERRORS, error_model=schemas.ErrorResponse,
)
def create_message() -> Response:
    body = parse(schemas.MessagesRequest, json_body())
    _reject_unsupported(body)
    generation = runtime().service.start(_generation_request(body))
    if body.stream:
        return sse_response(closing(_stream(generation), generation.close))
    text = generation.text()
    return jsonify(_message(generation, text))


@blueprint.post("/messages/count_tokens")
@documented(
    "Count the tokens of a prompt (Anthropic Messages API)", tags=TAGS, request=schemas.CountTokensRequest,
    description="The prompt that /v1/messages would give the model for these messages, counted by the model's own "
                "tokenizer. gpt4all offers no tokenizer on its own, so the model reads the prompt to count it (as long "
                "as a generation's prompt phase; nothing is generated).",
    responses={200: Reply("The count.", schemas.TokenCount)},
    errors={**ERRORS, 400: "Malformed input, or a prompt longer than the context window."}, error_model=schemas.ErrorResponse,
)
def count_tokens() -> Response:
    body = parse(schemas.CountTokensRequest, json_body())
    _reject_unsupported(body)
    tokens = runtime().service.count_tokens(GenerationRequest(
        sampling=SamplingParams(), model=body.model, messages=parse_messages(body)))
    return jsonify({"input_tokens": tokens})
