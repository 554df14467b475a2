"""The generic LLM API (llm-api): POST /generate, POST /agenerate, POST /embeddings, GET /check.

- /generate {prompt, params: {n_predict, temp, top_k, top_p, stop, repeat_penalty}} answers the
  generated text as a JSON string, as the original FastAPI server did;
- /agenerate streams it as Server-Sent Events, one event per token, the token itself as the event's
  data (a token holding a newline spans several `data:` lines, which SSE clients join with "\\n");
  an error after the stream began is an `event: error` whose data is the JSON error object;
- /embeddings {text} answers the vector as a JSON array of numbers (the embedding model);
- /check answers "Ok" (no API key needed, like /health).
Prompts go to the model as they are (no chat template). Unknown `params` are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from api.errors import ApiError
from api.generation import Generation, GenerationRequest
from api.wire import schemas
from api.wire.common import client_disconnected, closing, json_body, runtime, sampling_from, sse_response, stop_strings
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("llm_api", __name__)

TAGS = ("Generic LLM API",)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
SSE_LINE_END = "\r\n"


def _start(body: schemas.LlmGenerateRequest) -> Generation:
    params = body.params or schemas.LlmParams()
    sampling = sampling_from(params, {"max_tokens": "n_predict", "temperature": "temp"})
    return runtime().service.start(GenerationRequest(
        sampling=sampling, model=body.model, prompt=body.prompt, stop=stop_strings(params.stop),
        is_disconnected=client_disconnected()))


def token_event(text: str) -> str:
    """One SSE event carrying `text` as its data, in sse-starlette's framing (CRLF line ends)."""
    return "".join(f"data: {line}{SSE_LINE_END}" for line in _LINE_BREAK.split(text)) + SSE_LINE_END


def error_event(error: ApiError) -> str:
    return f"event: error{SSE_LINE_END}data: {json.dumps(error.to_dict(), ensure_ascii=False)}{SSE_LINE_END}{SSE_LINE_END}"


@blueprint.post("/generate")
@documented("Generate text (LLM API)", tags=TAGS, request=schemas.LlmGenerateRequest,
            responses={200: Reply("The generated text, as a JSON string.", {"type": "string"})}, errors=GENERATION_ERRORS)
def generate() -> Response:
    body = parse(schemas.LlmGenerateRequest, json_body())
    return jsonify(_start(body).text())


@blueprint.post("/agenerate")
@documented("Generate text as a stream of Server-Sent Events, one per token (LLM API)", tags=TAGS,
            request=schemas.LlmGenerateRequest,
            responses={200: Reply("One `data: <token>` event per token; the stream simply ends after the last one. An error "
                                  "after the start is an `event: error` with the JSON error object as data.",
                                  media_type="text/event-stream", events={"type": "string"})},
            errors=GENERATION_ERRORS)
def agenerate() -> Response:
    generation = _start(parse(schemas.LlmGenerateRequest, json_body()))

    def events() -> Iterator[str]:
        try:
            for piece in generation:
                yield token_event(piece)
        except ApiError as error:  # headers are gone: report in-band
            yield error_event(error)

    return sse_response(closing(events(), generation.close))


@blueprint.post("/embeddings")
@documented("Embed a text (LLM API)", tags=TAGS, request=schemas.LlmEmbeddingsRequest,
            responses={200: Reply("The vector, as a JSON array of numbers.", list[float])},
            errors={503: "No embedding model is installed (EMBEDDING_MODEL_NAME), or it is busy."})
def embeddings() -> Response:
    body = parse(schemas.LlmEmbeddingsRequest, json_body())
    state = runtime()
    vectors, _tokens = state.service.embed(state.models.embedding_model(None), [body.text], field="text",
                                            is_disconnected=client_disconnected())
    return jsonify(vectors[0])


@blueprint.get("/check")
@documented("Status check (LLM API; no API key needed)", tags=TAGS,
            responses={200: Reply('Always the JSON string "Ok" while the server answers.', {"const": "Ok"})})
def check() -> Response:
    return jsonify("Ok")
