"""The original contract: POST {ROUTE} with {prompt, persona}.

A success answers with the reply itself as text/plain, as the original server did; a client that
sends `Accept: application/json` gets the reply with its model, token usage and timings. Every
error is a JSON object with a 4xx/5xx status.

Fields: prompt (required), persona (the system prompt), assist (an earlier assistant message),
temp, and optionally max_tokens, top_p, top_k, stream (default: the STREAM setting).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.engine import SamplingParams
from api.generation import GenerationRequest, Outcome, check_sampling
from api.wire.common import client_disconnected, closing, get_field, get_text, json_body, runtime

DEFAULT_TEMPERATURE = 0.7


def _messages(body: dict[str, Any], header: str, footer: str) -> list[dict[str, str]]:
    prompt = get_text(body, "prompt", required=True, allow_empty=False)
    persona = get_text(body, "persona")
    assist = get_text(body, "assist")
    messages = []
    if persona:
        messages.append({"role": "system", "content": persona})
    if assist:
        messages.append({"role": "assistant", "content": assist})
    messages.append({"role": "user", "content": f"{header}{prompt}{footer}"})
    return messages


def _sampling(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    return check_sampling(SamplingParams(
        max_tokens=get_field(body, "max_tokens", int, default_max_tokens),
        temperature=get_field(body, "temp", float, DEFAULT_TEMPERATURE),
        top_p=get_field(body, "top_p", float, 0.9),
        top_k=get_field(body, "top_k", int, 40),
    ), {"temperature": "temp"})


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
    blueprint = Blueprint("gpt4all_api", __name__)

    @blueprint.post(route)
    def generate() -> Response:
        state = runtime()
        body = json_body()
        settings = state.settings
        stream = get_field(body, "stream", bool, settings.stream)
        generation = state.service.start(GenerationRequest(
            sampling=_sampling(body, settings.default_max_tokens),
            messages=_messages(body, settings.header, settings.footer),
            is_disconnected=client_disconnected(),
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
