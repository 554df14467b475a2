"""The Flask GPT4All server's interface (llm-api-docker): /v0/language-models/* and /v0/models.

Shapes are the ones its README documents:
- POST /v0/language-models/chat-completions {messages} -> {"id": "chat-completions-<time>", "replies": [...]}
- POST /v0/language-models/generate {prompt} -> {"id": "generate-<time>", "text": ...} (the raw prompt, no template)
- POST /v0/language-models/retrieve {model_name, model_path?, allow_download?} -> {"success", "message"}
- GET /v0/models -> {"models": [...]}
Both generation routes also take gpt4all's generate() parameters and `model` (api.wire.schemas.V0Sampling).
A failed retrieval answers `{"success": false, "message": ..., "error": {...}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from api.errors import ApiError, ModelNotFound
from api.generation import GenerationRequest
from api.model_download import model_file_name, resolve_folder
from api.wire import schemas
from api.wire.common import client_disconnected, downloader, error_reply, json_body, runtime, sampling_from
from api.wire.operation import GENERATION_ERRORS, Reply, documented
from api.wire.validation import parse

blueprint = Blueprint("v0", __name__)

TAGS = ("Flask GPT4All server (/v0)",)


def _stamp() -> str:
    return f"{time.time():.6f}"


def _generate(body: schemas.V0Sampling, **request: object) -> str:
    generation = runtime().service.start(GenerationRequest(
        sampling=sampling_from(body, {"temperature": "temp"}), model=body.model, is_disconnected=client_disconnected(), **request))  # type: ignore[arg-type]
    return generation.text()


@blueprint.post("/language-models/chat-completions")
@documented("Chat completion (/v0)", tags=TAGS, request=schemas.V0ChatRequest,
            description="The messages go through the model's own chat template.",
            responses={200: Reply("The assistant's reply.", schemas.V0ChatReply)}, errors=GENERATION_ERRORS)
def chat_completions() -> Response:
    body = parse(schemas.V0ChatRequest, json_body())
    messages = [{"role": message.role, "content": message.content} for message in body.messages]
    text = _generate(body, messages=messages)
    return jsonify({"id": f"chat-completions-{_stamp()}", "replies": [{"role": "assistant", "content": text}]})


@blueprint.post("/language-models/generate")
@documented("Generate text from a raw prompt (/v0)", tags=TAGS, request=schemas.V0GenerateRequest,
            responses={200: Reply("The generated text.", schemas.V0GenerateReply)}, errors=GENERATION_ERRORS)
def generate() -> Response:
    body = parse(schemas.V0GenerateRequest, json_body())
    text = _generate(body, prompt=body.prompt)
    return jsonify({"id": f"generate-{_stamp()}", "text": text})


def _retrieve(body: schemas.V0RetrieveRequest) -> str:
    settings = runtime().settings
    name = model_file_name(body.model_name, param="model_name")
    folder = resolve_folder(settings.model_path, body.model_path)
    if (folder / name).is_file():
        return f"Model {name} is installed."
    if not body.allow_download:
        raise ModelNotFound(f"the model '{name}' is not installed and allow_download is false", param="model_name")
    return downloader().retrieve(name, folder).message


@blueprint.post("/language-models/retrieve")
@documented(
    "Retrieve a model: report it if installed, else download it (/v0)", tags=TAGS, request=schemas.V0RetrieveRequest,
    description="Downloads come from the model catalog (MODEL_CATALOG_URL) and only when the server allows them "
                "(ALLOW_DOWNLOAD=true); they are checked against the catalog's size and checksum before the model "
                "appears under its name. `model_path` may only be MODEL_PATH or a folder inside it.",
    responses={200: Reply("The model is installed (now).", schemas.V0RetrieveReply)},
    errors={403: "Downloads are disabled (`code`: download_disabled), `model_path` leads outside MODEL_PATH "
                 "(`code`: outside_model_path), or the client address is not authorized.",
            404: "Not installed and allow_download is false, the catalog does not list it, or `model_path` names no "
                 "existing folder.",
            502: "The download failed (truncated, wrong checksum, server error).",
            504: "The download server stopped answering.", 507: "Not enough disk space."},
    error_model=schemas.V0RetrieveError,
)
def retrieve() -> Response:
    try:
        message = _retrieve(parse(schemas.V0RetrieveRequest, json_body()))
    except ApiError as error:
        return error_reply(error, {"success": False, "message": error.message, **error.to_dict()})
    return jsonify({"success": True, "message": message})


@blueprint.get("/models")
@documented("List the installed models (/v0)", tags=TAGS, responses={200: Reply("The installed model files.", schemas.V0ModelList)})
def models() -> Response:
    return jsonify({"models": [model.file_name for model in runtime().models.installed()]})
