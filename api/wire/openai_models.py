"""OpenAI's models and embeddings under /v1, with the extras of the earlier FastAPI-style GPT4All
servers (engines, health, model retrieval). The shapes are OpenAI's; see api/wire/openai_chat.py.
"""

from __future__ import annotations

import base64
import struct

from flask import Blueprint, Response, jsonify

from api.errors import DownloadDisabled, InvalidRequest, ModelNotFound
from api.model_download import DISABLED_MESSAGE
from api.model_names import InstalledModel, ModelNameError, file_name_for, model_id
from api.wire import schemas
from api.wire.common import client_disconnected, downloader, is_token_ids, json_body, runtime
from api.wire.operation import Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("openai_models", __name__)

TAGS_MODELS = ("OpenAI: models and embeddings",)


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
    raw = json_body()
    if is_token_ids(raw.get("input")):
        raise InvalidRequest(
            "'input': token ids are not supported, only text (the ids belong to the client's tokenizer, such as "
            "tiktoken's cl100k_base, not to this model's). langchain's OpenAIEmbeddings sends them by default: create "
            "it with check_embedding_ctx_length=False to send the texts", param="input", code="token_ids_not_supported")
    body = parse(schemas.EmbeddingRequest, raw)
    texts = _embedding_inputs(body)
    state = runtime()
    model = state.models.embedding_model(body.model)
    vectors, tokens = state.service.embed(model, texts, is_disconnected=client_disconnected())
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
