"""OpenAI's Responses API, stateless: POST /v1/responses (mounted under /v1 beside api/wire/openai_chat.py).

A thin adapter: `input` (a string, or message items with text content) and `instructions` become
chat messages for the generation service; the reply comes back as one output message. Shapes follow
OpenAI's documentation: the `response` object, and when streaming, typed events with a sequence
number, each sent as `event: <type>` + `data: {json}`: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (one per
piece), response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed (or response.incomplete when max_output_tokens cut the reply). An error after the
stream began is an `error` event followed by response.failed. Errors before it are OpenAI's error
object with a 4xx/5xx status, as on the other /v1 routes. Request fields: api/wire/responses_schemas.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from api.errors import ApiError, InvalidRequest
from api.generation import Generation, GenerationRequest, Outcome
from api.model_names import model_id
from api.sampling import SamplingParams
from api.wire import responses_schemas as schemas
from api.wire.common import client_disconnected, closing, json_body, runtime, sse_event, sse_response
from api.wire.openai_chat import ROLES
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("responses", __name__)

TAGS = ("OpenAI: responses",)


# -- request


def _reject_unsupported(body: schemas.ResponsesRequest) -> None:
    """What a stateless server without tools cannot do is refused, never silently ignored."""
    refusals = (
        ("store", body.store, "this server stores no responses; send store: false"),
        ("previous_response_id", body.previous_response_id, "this server stores no responses; send the whole "
                                                            "conversation in 'input'"),
        ("conversation", body.conversation, "this server stores no conversations; send the whole conversation in 'input'"),
        ("prompt", body.prompt, "stored prompt templates are not supported"),
        ("background", body.background, "background mode is not supported"),
        ("tools", body.tools, "tools are not supported by this server"),
        ("top_logprobs", body.top_logprobs, "log probabilities are not supported by this server"),
    )
    for name, value, reason in refusals:
        if value not in (None, False, [], 0):
            raise InvalidRequest(f"'{name}': {reason}", param=name)
    if body.tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("'tool_choice': tools are not supported by this server", param="tool_choice")
    text_format = (body.text or {}).get("format") or {"type": "text"}
    if not isinstance(text_format, dict) or text_format.get("type") != "text":
        raise InvalidRequest("'text.format': only {\"type\": \"text\"} is supported", param="text.format")


def _content(content: str | list[schemas.InputText]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def parse_messages(body: schemas.ResponsesRequest) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    return [*messages, *({"role": ROLES[item.role], "content": _content(item.content)} for item in body.input)]


def _generation_request(body: schemas.ResponsesRequest) -> GenerationRequest:
    return GenerationRequest(
        sampling=SamplingParams(max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p),
        model=body.model,
        messages=parse_messages(body),
        is_disconnected=client_disconnected(),
        prompt_field="input",
    )


# -- the response object


class _Reply:
    """The ids and request fields one response object repeats in every event."""

    def __init__(self, body: schemas.ResponsesRequest, generation: Generation) -> None:
        self.body = body
        self.id = "resp_" + generation.id
        self.message_id = "msg_" + generation.id
        self.created_at = generation.created
        self.model = model_id(generation.model_name)

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_output_text(text)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def response(self, status: str, output: list[dict[str, Any]], outcome: Outcome | None = None,
                 error: ApiError | None = None) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": {"code": "server_error", "message": error.message} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": True, "previous_response_id": None, "store": False,
            "background": False, "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "truncation": "disabled",
            "usage": _usage(outcome) if outcome else None, "metadata": body.metadata or {},
        }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {"input_tokens": outcome.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": outcome.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": outcome.total_tokens}


def _final_status(outcome: Outcome) -> str:
    return "incomplete" if outcome.finish_reason == "length" else "completed"


# -- streaming


class _Events:
    """Numbers the events of one stream, in OpenAI's framing (`event: <type>` then `data: <json>`)."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\n{sse_event(payload)}"


def _stream(reply: _Reply, generation: Generation) -> Iterator[str]:
    event = _Events()
    where = {"item_id": reply.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=reply.response("in_progress", []))
    yield event("response.in_progress", response=reply.response("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=reply.message(None, "in_progress"))
    yield event("response.content_part.added", **where, part=_output_text(""))
    pieces: list[str] = []
    try:
        for piece in generation:
            pieces.append(piece)
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
    except ApiError as error:  # headers are gone: report in-band, as OpenAI does
        yield event("error", code=error.code, message=error.message, param=error.param)
        yield event("response.failed", response=reply.response("failed", [reply.message("".join(pieces), "incomplete")],
                                                               error=error))
        return
    assert generation.outcome is not None
    text, status = "".join(pieces), _final_status(generation.outcome)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_output_text(text))
    message = reply.message(text, status)
    yield event("response.output_item.done", output_index=0, item=message)
    yield event(f"response.{status}", response=reply.response(status, [message], generation.outcome))


@blueprint.post("/responses")
@documented(
    "Create a response (OpenAI Responses API, stateless)", tags=TAGS, request=schemas.ResponsesRequest,
    description="`input` and `instructions` go through the model's own chat template. Nothing is stored: `store: true`, "
                "`previous_response_id`, `conversation`, stored prompts, background mode and tools are refused with a "
                "400 naming the field.",
    responses={200: (Reply("The response object (stream: false).", schemas.Response),
                     Reply("Server-Sent Events (stream: true): `event: <type>` and `data: {event}`, numbered by "
                           "`sequence_number`, from response.created to response.completed (or response.incomplete).",
                           media_type="text/event-stream", events=schemas.StreamEvent))},
    errors=GENERATION_ERRORS,
)
def create_response() -> Response:
    body = parse(schemas.ResponsesRequest, json_body())
    _reject_unsupported(body)
    generation = runtime().service.start(_generation_request(body))
    reply = _Reply(body, generation)
    if body.stream:
        return sse_response(closing(_stream(reply, generation), generation.close))
    text = generation.text()
    assert generation.outcome is not None
    status = _final_status(generation.outcome)
    return jsonify(reply.response(status, [reply.message(text, status)], generation.outcome))
