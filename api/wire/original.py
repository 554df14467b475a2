"""The original contract: POST {ROUTE} with {prompt, persona}.

A success answers with the reply itself as text/plain, as the original server did; a client that
sends `Accept: application/json` gets the reply with its model, token usage and timings. Every
error is a JSON object with a 4xx/5xx status.

Fields (api.wire.schemas.OriginalRequest): prompt (required), persona (the system prompt), assist
(an earlier assistant message), temp, and optionally max_tokens, top_p, top_k, repeat_penalty,
repeat_last_n, stream (default: the STREAM setting). Sampling values left out are gpt4all's own
generate() defaults, as the original server got them from the bindings.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.generation import GenerationRequest, Outcome
from api.wire import schemas
from api.wire.common import client_disconnected, closing, json_body, runtime, sampling_from
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse


def _messages(body: schemas.OriginalRequest, header: str, footer: str) -> list[dict[str, str]]:
    messages = []
    if body.persona:
        messages.append({"role": "system", "content": body.persona})
    if body.assist:
        messages.append({"role": "assistant", "content": body.assist})
    messages.append({"role": "user", "content": f"{header}{body.prompt}{footer}"})
    return messages


def _summary(reply: str, model: str, outcome: Outcome) -> dict[str, object]:
    return {
        "reply": reply,
        "model": model,
        "finish_reason": outcome.finish_reason,
        "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                  "total_tokens": outcome.total_tokens},
        "timings": {"prompt_seconds": round(outcome.prompt_seconds, 4), "total_seconds": round(outcome.total_seconds, 4),
                    "tokens_per_second": round(outcome.tokens_per_second, 2)},
    }


def create_blueprint(route: str) -> Blueprint:
    blueprint = Blueprint("original", __name__)

    @blueprint.post(route)
    @documented(
        "The original route: a prompt and a persona", tags=("Original GPT4All API",), request=schemas.OriginalRequest,
        description="The path is the ROUTE setting. HEADER and FOOTER are put around the prompt, which goes through the "
                    "model's chat template with the persona as the system prompt.",
        responses={200: (Reply("The reply itself (streamed while generated when stream is true).", {"type": "string"},
                               media_type="text/plain"),
                         Reply("With `Accept: application/json`: the reply with model, usage and timings.",
                               schemas.OriginalReply))},
        errors={status: GENERATION_ERRORS[status] for status in (503, 504)},  # no `model` field: no 404
    )
    def generate() -> Response:
        state = runtime()
        body = parse(schemas.OriginalRequest, json_body())
        settings = state.settings
        stream = settings.stream if body.stream is None else body.stream
        generation = state.service.start(GenerationRequest(
            sampling=sampling_from(body, {"temperature": "temp"}, min_p=schemas.GPT4ALL_MIN_P),
            messages=_messages(body, settings.header, settings.footer),
            is_disconnected=client_disconnected(),
            prompt_field="prompt",
        ))
        if stream:
            return Response(closing(iter(generation), generation.close), mimetype="text/plain",
                            headers={"X-Accel-Buffering": "no"})
        reply = generation.text()
        assert generation.outcome is not None
        if request.accept_mimetypes.best_match(["text/plain", "application/json"]) == "application/json" \
                and "application/json" in request.accept_mimetypes.values():
            return jsonify(_summary(reply, generation.model_name, generation.outcome))
        return Response(reply, mimetype="text/plain")

    return blueprint
