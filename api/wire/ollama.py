"""Ollama's native API: the routes that Open WebUI, Continue, AnythingLLM, aider and the `ollama` and
`langchain-ollama` packages speak, after Ollama's API documentation, field by field.

- `GET /` and `HEAD /` answer "Ollama is running"; `GET /api/version` the version of Ollama's API
  we follow. Both are health checks: open without the API key.
- `GET /api/tags` lists the installed models as `<file name without .gguf>:latest`, with details
  from the GGUF header; `POST /api/show` describes one (modelfile, parameters, template, details,
  model_info); `GET /api/ps` lists what this worker has loaded.
- `POST /api/chat` and `POST /api/generate` stream newline-delimited JSON by default (one object
  per piece of text, then one with `done: true`, `done_reason`, token counts and durations in
  nanoseconds); `stream: false` answers one object. An error after the first line is sent is a
  last line `{"error": ...}`, which the official client raises.
- `POST /api/embed` and the older `POST /api/embeddings`.
- Errors are `{"error": "..."}` with the status Ollama gives (an unknown model is a 404).

A request that names an option we cannot honour (`format`, `tools`, images, `think`, ...) gets a 400
naming it rather than an answer that silently ignored it. Sampling, limits, stop strings and
cancellation are the generation service's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, jsonify

from api.chat_template import FALLBACK_TEMPLATE
from api.errors import ApiError, InvalidRequest, ModelNotFound
from api.generation import Generation, GenerationRequest, Outcome
from api.gguf_file import SPECIAL_TOKEN_TEXT_KEYS, GGUFFormatError, read_gguf_header, read_metadata, read_tensor_infos
from api.model_names import InstalledModel, ModelNameError, file_name_for, model_id
from api.sampling import SamplingParams
from api.wire import ollama_schemas as schemas
from api.wire import shapes
from api.wire.common import client_disconnected, closing, error_reply, json_body, runtime, stop_strings
from api.wire.operation import Reply, documented
from api.wire.validation import parse

log = logging.getLogger("api.wire.ollama")
blueprint = Blueprint("ollama", __name__)

TAGS = ("Ollama API",)
OLLAMA_VERSION = "0.12.6"
"""The Ollama release whose API these routes follow; clients gate features on it."""
RUNNING_MESSAGE = "Ollama is running"
LATEST = ":latest"
NDJSON = "application/x-ndjson"
NEVER_EXPIRES = "9999-12-31T23:59:59Z"
_ZERO_DURATION = re.compile(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?")

GENERATION_ERRORS = {
    400: "Malformed JSON, a wrong type or a value out of range; or the model is an embedding model "
         "(`\"<model>\" does not support chat`, in Ollama's words).",
    404: "The model is not installed (the message lists the installed ones).",
    503: "The model is loading or busy; retry after `Retry-After` seconds.",
    504: "The generation ran over REQUEST_TIMEOUT or stalled for STALL_TIMEOUT.",
}
EMBEDDING_ERRORS = {400: "Malformed JSON, a wrong type or a value out of range; or the model is a chat model (gpt4all "
                         "embeds only with embedding models).",
                    404: "The model is not installed.", 503: "No embedding model is installed, or it is busy."}


# -- errors in Ollama's shape


owns = shapes.ollama_owns


def error_response(error: ApiError) -> Response:
    """Ollama's error body, {"error": "..."}, with the status and Retry-After."""
    return error_reply(error, shapes.ollama_error_body(error))


# -- model names and the GGUF header


def _model_id(requested: str) -> str:
    """Ollama's `name:tag` to our model id: `latest` is the one tag every model has."""
    return requested[: -len(LATEST)] if requested.endswith(LATEST) else requested


def _find_installed(requested: str) -> InstalledModel | None:
    try:
        name = file_name_for(_model_id(requested))
    except ModelNameError:
        return None
    return next((model for model in runtime().models.installed() if model.file_name == name), None)


def _not_found(requested: str) -> ModelNotFound:
    available = ", ".join(model.id + LATEST for model in runtime().models.installed()) or "none"
    return ModelNotFound(f"model '{requested}' not found. Available models: {available}", param="model")


def _not_for_generation(requested: str, route: str) -> InvalidRequest:
    """An embedding model named on /api/chat or /api/generate: a 400 with Ollama's own words
    (server/routes.go answers `"%q does not support chat"` when the model lacks the completion
    capability), then which route it is for."""
    return InvalidRequest(f"{json.dumps(requested)} does not support {route}: it is an embedding model (use /api/embed)",
                          param="model")


def _not_for_embedding(requested: str, embedder: str) -> InvalidRequest:
    """A chat model named on /api/embed or /api/embeddings: a 400. Ollama itself checks no capability
    there (llama.cpp pools any model's states into a vector) and answers a failed embedding with a 400
    on /api/embed; gpt4all embeds only with embedding models, so the request is what cannot be served."""
    return InvalidRequest(f"'{requested}' is a chat model; embeddings come from {embedder}", param="model")


def _installed(requested: str) -> InstalledModel:
    found = _find_installed(requested)
    if found is None:
        raise _not_found(requested)
    return found


def human_number(count: int) -> str:
    """A parameter count the way Ollama prints it: 134515008 -> "134.52M", 8030261248 -> "8.0B"."""
    for scale, unit, decimals in ((1e9, "B", 1), (1e6, "M", 2)):
        if count >= scale:
            number = count / scale
            return f"{number:.0f}{unit}" if number.is_integer() else f"{number:.{decimals}f}{unit}"
    return f"{count / 1e3:.0f}K" if count >= 1000 else str(count)


def _parameter_count(model: InstalledModel, metadata: dict[str, Any]) -> int | None:
    declared = metadata.get("general.parameter_count")
    if isinstance(declared, int):
        return declared
    try:
        _header, tensors, _size = read_tensor_infos(model.path)
    except (GGUFFormatError, OSError):
        return None
    return sum(math.prod(tensor.shape) for tensor in tensors)


def _quantization_level(metadata: dict[str, Any]) -> str:
    from gguf import LlamaFileType  # imported here: only the model listings need it

    try:
        return LlamaFileType(metadata.get("general.file_type")).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return "unknown"


def _details(model: InstalledModel, metadata: dict[str, Any]) -> dict[str, object]:
    count = _parameter_count(model, metadata)
    return {"parent_model": "", "format": "gguf", "family": model.architecture, "families": [model.architecture],
            "parameter_size": human_number(count) if count is not None else "unknown",
            "quantization_level": _quantization_level(metadata)}


def _context_window(model: InstalledModel, metadata: dict[str, Any]) -> int:
    """The context window a worker loads this model with (as api/engine.py does: a chat model gets the
    smaller of N_CTX and what it was trained for)."""
    trained = metadata.get(f"{model.architecture}.context_length")
    if model.is_embedding:
        return trained if isinstance(trained, int) else 512
    n_ctx = runtime().settings.n_ctx
    return min(n_ctx, trained) if isinstance(trained, int) else n_ctx


def _timestamp(seconds: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _listing(model: InstalledModel, metadata: dict[str, Any]) -> dict[str, object]:
    identity = f"{model.file_name}\0{model.size_bytes}\0{model.created}".encode()
    return {"name": model.id + LATEST, "model": model.id + LATEST, "modified_at": _timestamp(model.created),
            "size": model.size_bytes, "digest": hashlib.sha256(identity).hexdigest(), "details": _details(model, metadata)}


# -- model routes


@blueprint.get("/")
@documented("Ollama's liveness check (no API key needed)", tags=TAGS, error_model=schemas.OllamaError,
            responses={200: Reply(f'Always "{RUNNING_MESSAGE}" while the server answers (HEAD too).', {"type": "string"},
                                  media_type="text/plain")})
def root() -> Response:
    return Response(RUNNING_MESSAGE, mimetype="text/plain")


@blueprint.get("/api/version")
@documented("The version of Ollama's API this server follows (no API key needed)", tags=TAGS,
            error_model=schemas.OllamaError, responses={200: Reply("The version.", schemas.OllamaVersion)})
def version() -> Response:
    return jsonify({"version": OLLAMA_VERSION})


@blueprint.get("/api/tags")
@documented("List the installed models (Ollama)", tags=TAGS, error_model=schemas.OllamaError,
            responses={200: Reply("The installed chat and embedding models.", schemas.OllamaTags)})
def tags() -> Response:
    return jsonify({"models": [_listing(model, read_metadata(model.path)) for model in runtime().models.installed()]})


@blueprint.get("/api/ps")
@documented("List the models this worker has loaded (Ollama)", tags=TAGS, error_model=schemas.OllamaError,
            responses={200: Reply("The loaded models.", schemas.OllamaRunning)})
def running() -> Response:
    state = runtime()
    loaded = set(state.models.loaded_files())
    models = []
    for model in state.models.installed():
        if model.file_name in loaded:
            metadata = read_metadata(model.path)
            models.append({**_listing(model, metadata), "expires_at": NEVER_EXPIRES,
                           "size_vram": model.size_bytes if state.settings.device != "cpu" else 0,
                           "context_length": _context_window(model, metadata)})
    return jsonify({"models": models})


def _parameters(num_ctx: int, metadata: dict[str, Any], model: InstalledModel) -> list[tuple[str, str]]:
    parameters = [("num_ctx", str(num_ctx))]
    eos = metadata.get("eos_token")
    if eos and not model.is_embedding:
        parameters.append(("stop", json.dumps(eos, ensure_ascii=False)))
    return parameters


def _model_info(model: InstalledModel, metadata: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """The GGUF metadata, as Ollama reports it: arrays empty unless verbose; the chat template is `template`."""
    values = ({key: found.value for key, found in read_gguf_header(model.path, load_arrays=True).fields.items()}
              if verbose else metadata)
    return {key: [] if value is None else value for key, value in values.items()
            if key not in SPECIAL_TOKEN_TEXT_KEYS and key != "tokenizer.chat_template"}


@blueprint.post("/api/show")
@documented("Describe an installed model (Ollama)", tags=TAGS, request=schemas.OllamaShowRequest,
            error_model=schemas.OllamaError, description="`name` is accepted for `model`, as older clients send it.",
            responses={200: Reply("The model's parameters, template, details and GGUF metadata.", schemas.OllamaShow)},
            errors={404: "No such model is installed."})
def show() -> Response:
    body = parse(schemas.OllamaShowRequest, json_body())
    model = _installed(body.model)
    metadata = read_metadata(model.path)
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) and template else FALLBACK_TEMPLATE
    parameters = _parameters(_context_window(model, metadata), metadata, model)
    modelfile = "\n".join([f"# Modelfile of {model.id}{LATEST}, as this server runs it", f"FROM {model.file_name}",
                           f'TEMPLATE """{template}"""', *(f"PARAMETER {name} {value}" for name, value in parameters)])
    license_text = metadata.get("general.license")
    return jsonify({
        "modelfile": modelfile,
        "parameters": "\n".join(f"{name:<30} {value}" for name, value in parameters),
        "template": template,
        "details": _details(model, metadata),
        "model_info": _model_info(model, metadata, body.verbose),
        "capabilities": ["embedding"] if model.is_embedding else ["completion"],
        "modified_at": _timestamp(model.created),
        **({"license": license_text} if isinstance(license_text, str) else {}),
    })


# -- generation: what we cannot honour, and how options map


def _refuse(param: str, value: object, what: str) -> None:
    """A 400 naming `param` when the client asked for something this server cannot do."""
    if value not in (None, "", False, 0, [], {}):
        raise InvalidRequest(f"'{param}': {what} is not supported by this server", param=param)


def _refuse_unsupported(body: schemas.OllamaGeneration) -> None:
    _refuse("format", body.format, "structured output (JSON mode or a JSON schema)")
    _refuse("think", body.think, "thinking (this model does not think)")
    _refuse("logprobs", body.logprobs, "returning log probabilities")
    _refuse("top_logprobs", body.top_logprobs, "returning log probabilities")


def _is_zero_duration(keep_alive: str | float | None) -> bool:
    if isinstance(keep_alive, str):
        return bool(_ZERO_DURATION.fullmatch(keep_alive.strip()))
    return keep_alive == 0


def _sampling(options: schemas.OllamaOptions, context_window: Callable[[], int]) -> SamplingParams:
    return SamplingParams(
        max_tokens=options.num_predict if options.num_predict > 0 else None,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        repeat_penalty=options.repeat_penalty,
        repeat_last_n=options.repeat_last_n if options.repeat_last_n >= 0 else context_window(),
    )


def _start(body: schemas.OllamaGeneration, *, prompt_field: str, messages: list[dict[str, str]] | None = None,
           prompt: str | None = None) -> Generation:
    options = body.options or schemas.OllamaOptions()
    model = _model_id(body.model)

    def context_window() -> int:
        return runtime().models.chat_model(model).context_length

    try:
        if options.num_ctx is not None and options.num_ctx > (window := context_window()):
            raise InvalidRequest(f"'options.num_ctx' must be at most {window}, the context window this server runs the "
                                 "model with (N_CTX, or less if the model was trained for less)", param="options.num_ctx")
        return runtime().service.start(GenerationRequest(
            sampling=_sampling(options, context_window), model=model, messages=messages, prompt=prompt,
            stop=stop_strings(options.stop), is_disconnected=client_disconnected(), prompt_field=prompt_field))
    except ModelNotFound as error:
        if error.code == "not_a_chat_model":
            raise _not_for_generation(body.model, "chat" if prompt_field == "messages" else "generate") from None
        raise _not_found(body.model) from None  # named as the client named it, listed as /api/tags lists them


# -- generation: replies


Piece = Callable[[str], dict[str, object]]
"""Where a piece of the reply goes in one object: `message.content` (chat) or `response` (generate)."""


def _chat_piece(text: str) -> dict[str, object]:
    return {"message": {"role": "assistant", "content": text}}


def _generate_piece(text: str) -> dict[str, object]:
    return {"response": text}


def _nanoseconds(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _stats(outcome: Outcome, started_ns: int) -> dict[str, object]:
    total = time.perf_counter_ns() - started_ns
    generating = _nanoseconds(outcome.total_seconds)
    prompt = _nanoseconds(outcome.prompt_seconds)
    return {"done_reason": outcome.finish_reason, "total_duration": total, "load_duration": max(0, total - generating),
            "prompt_eval_count": outcome.prompt_tokens, "prompt_eval_duration": prompt,
            "eval_count": outcome.completion_tokens, "eval_duration": max(0, generating - prompt)}


def _line(payload: dict[str, object]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"


def _stream_lines(model: str, generation: Generation, started_ns: int, piece: Piece) -> Iterator[str]:
    try:
        for text in generation:
            yield _line({"model": model, "created_at": _timestamp(), **piece(text), "done": False})
        assert generation.outcome is not None
        yield _line({"model": model, "created_at": _timestamp(), **piece(""), "done": True,
                     **_stats(generation.outcome, started_ns)})
    except ApiError as error:  # the status line is gone: report in-band, as Ollama does
        yield _line({"error": error.message})


def _reply(body: schemas.OllamaGeneration, generation: Generation, started_ns: int, piece: Piece) -> Response:
    if body.stream:
        lines = closing(_stream_lines(body.model, generation, started_ns, piece), generation.close)
        return Response(lines, mimetype=NDJSON, headers={"X-Accel-Buffering": "no"})
    text = generation.text()
    assert generation.outcome is not None
    return jsonify({"model": body.model, "created_at": _timestamp(), **piece(text), "done": True,
                    **_stats(generation.outcome, started_ns)})


def _load_only(body: schemas.OllamaGeneration, piece: Piece, route: str) -> Response:
    """Ollama's answer to a request with nothing to generate: the model is there (or a 404); no model runs."""
    model = _installed(body.model)
    if model.is_embedding:
        raise _not_for_generation(body.model, route)
    reason = "unload" if _is_zero_duration(body.keep_alive) else "load"
    return jsonify({"model": body.model, "created_at": _timestamp(), **piece(""), "done": True, "done_reason": reason})


def _generation_replies(summary: str, model: type[schemas.OllamaStats]) -> dict[int, Reply | tuple[Reply, ...]]:
    return {200: (Reply(f"{summary} (stream: false, or nothing to generate).", model),
                  Reply("Newline-delimited JSON (stream: true, the default): one object per piece of the reply, then one "
                        "with done: true and the statistics; an error after the start is a last line {\"error\": ...}.",
                        media_type=NDJSON, events=model | schemas.OllamaError))}


@blueprint.post("/api/chat")
@documented("Chat (Ollama)", tags=TAGS, request=schemas.OllamaChatRequest, error_model=schemas.OllamaError,
            description="The messages go through the model's own chat template.",
            responses=_generation_replies("The reply", schemas.OllamaChatResponse), errors=GENERATION_ERRORS)
def chat() -> Response:
    started_ns = time.perf_counter_ns()
    body = parse(schemas.OllamaChatRequest, json_body())
    _refuse_unsupported(body)
    _refuse("tools", body.tools, "tool calling")
    for index, message in enumerate(body.messages):
        _refuse(f"messages[{index}].images", message.images, "images (this server runs text models)")
        _refuse(f"messages[{index}].tool_calls", message.tool_calls, "tool calling")
    if not body.messages:
        return _load_only(body, _chat_piece, "chat")
    messages = [{"role": message.role, "content": message.content} for message in body.messages]
    return _reply(body, _start(body, prompt_field="messages", messages=messages), started_ns, _chat_piece)


@blueprint.post("/api/generate")
@documented("Generate from a prompt (Ollama)", tags=TAGS, request=schemas.OllamaGenerateRequest,
            error_model=schemas.OllamaError,
            description="The prompt (after `system`) goes through the model's chat template as a user message, or to the "
                        "model as it is with `raw: true`.",
            responses=_generation_replies("The reply", schemas.OllamaGenerateResponse), errors=GENERATION_ERRORS)
def generate() -> Response:
    started_ns = time.perf_counter_ns()
    body = parse(schemas.OllamaGenerateRequest, json_body())
    _refuse_unsupported(body)
    _refuse("images", body.images, "images (this server runs text models)")
    _refuse("suffix", body.suffix, "a suffix (insertion)")
    _refuse("template", body.template, "a prompt template of the request's own (the model's chat template is used)")
    _refuse("context", body.context, "context from an earlier reply (this server returns none)")
    if body.raw and body.system:
        raise InvalidRequest("'system' cannot be combined with raw: a raw prompt goes to the model as it is", param="system")
    if not body.prompt:
        return _load_only(body, _generate_piece, "generate")
    if body.raw:
        generation = _start(body, prompt_field="prompt", prompt=body.prompt)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        generation = _start(body, prompt_field="prompt", messages=[*messages, {"role": "user", "content": body.prompt}])
    return _reply(body, generation, started_ns, _generate_piece)


# -- embeddings


def _embedding_model(requested: str):
    """The embedding model the client named; a chat model named here gets a 404 that says which model embeds."""
    models = runtime().models
    try:
        return models.embedding_model(_model_id(requested))
    except ModelNotFound:
        found = _find_installed(requested)
        if found is not None and not found.is_embedding:
            embedder = model_id(models.settings.embedding_model_name) + LATEST
            raise _not_for_embedding(requested, embedder) from None
        raise _not_found(requested) from None


@blueprint.post("/api/embed")
@documented("Embed texts (Ollama)", tags=TAGS, request=schemas.OllamaEmbedRequest, error_model=schemas.OllamaError,
            responses={200: Reply("One vector per text (none for an empty input). load_duration is 0: the embedding "
                                  "model is loaded when the worker starts.", schemas.OllamaEmbedResponse)},
            errors=EMBEDDING_ERRORS)
def embed() -> Response:
    started_ns = time.perf_counter_ns()
    body = parse(schemas.OllamaEmbedRequest, json_body())
    texts = list(body.input) if isinstance(body.input, list) else [body.input] if body.input else []
    model = _embedding_model(body.model)
    vectors, tokens = runtime().service.embed(model, texts, field="input", is_disconnected=client_disconnected()) if texts else ([], 0)
    if body.dimensions and vectors and body.dimensions != len(vectors[0]):  # 0: not given (Go's zero value)
        raise InvalidRequest(f"'dimensions' must be {len(vectors[0])} for this model (it cannot be shortened)",
                             param="dimensions")
    return jsonify({"model": body.model, "embeddings": vectors, "total_duration": time.perf_counter_ns() - started_ns,
                    "load_duration": 0, "prompt_eval_count": tokens})


@blueprint.post("/api/embeddings")
@documented("Embed one text (Ollama's older route)", tags=TAGS, request=schemas.OllamaEmbeddingsRequest,
            error_model=schemas.OllamaError,
            responses={200: Reply("The vector (empty for an empty prompt).", schemas.OllamaEmbeddingsResponse)},
            errors=EMBEDDING_ERRORS)
def embeddings() -> Response:
    body = parse(schemas.OllamaEmbeddingsRequest, json_body())
    model = _embedding_model(body.model)
    vectors, _tokens = runtime().service.embed(model, [body.prompt], field="prompt",
                                                  is_disconnected=client_disconnected()) if body.prompt else ([[]], 0)
    return jsonify({"embedding": vectors[0]})
