"""The Flask application factory: one blueprint per wire format, configuration passed in.

Interfaces: /health; the original POST {ROUTE}; OpenAI /v1 (with the FastAPI GPT4All servers'
extras); the Flask /v0 server; the generic LLM API (/generate, /agenerate, /embeddings, /check);
OpenAI's /v1/responses; Anthropic's /v1/messages; Ollama's API (/, /api/*); /openapi.json and /docs.
Every route needs API_KEY when it is set, except the health checks (/health, /v1/health, /check,
Ollama's / and /api/version) and, with DOCS_PUBLIC=true, the documentation.
"""

from __future__ import annotations

import logging
import os

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

from api.access import AccessPolicy
from api.config import Settings
from api.errors import ApiError, EngineFailure, MethodNotAllowed, NotFound, PayloadTooLarge
from api.metrics import meters
from api.model_download import ModelDownloader
from api.request_log import REQUEST_ID_HEADER, RequestRecord, log_access, request_id
from api.request_log import current as current_request
from api.runtime import Runtime
from api.wire.common import error_reply

log = logging.getLogger("api.app")

WORKER_HEADER = "X-Worker-Pid"
WORKER_REQUEST = "gpt4all_api.worker_request"
"""The WSGI environ key under which a worker's server puts its handle for the request (its waitress
task, api/worker/connections.py): the request record carries it to the generation service, which
gives it to the InferenceObserver with each inference. Absent outside a worker."""


def error_response(error: ApiError) -> Response:
    """An error in the OpenAI shape, which every interface without a shape of its own uses."""
    return error_reply(error, error.to_dict())


def http_api_error(error: HTTPException) -> ApiError:
    if isinstance(error, RequestEntityTooLarge):
        return PayloadTooLarge("the request body is larger than MAX_REQUEST_BYTES")
    if error.code == 404:
        return NotFound(f"no route {request.method} {request.path}")
    if error.code == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    generic = ApiError(error.description or error.name)
    generic.status = error.code or 500
    generic.type = "invalid_request_error" if generic.status < 500 else "server_error"
    return generic


def finish_request(record: RequestRecord) -> None:
    """Once the last byte is sent (a stream's too): the duration and the access-log line."""
    meters().request_seconds.labels(record.wire_format).observe(record.elapsed())
    log_access(record)


def create_app(settings: Settings, runtime: Runtime) -> Flask:
    from api.openapi import create_blueprint as docs_blueprint
    from api.wire import anthropic, health, llm_api, ollama, openai_chat, openai_models, original, responses, v0

    app = Flask("api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # keep the documented field order of each wire format
    app.extensions["runtime"] = runtime
    app.extensions["downloader"] = ModelDownloader(settings)
    policy = AccessPolicy.from_settings(settings)
    # Interfaces with an error shape of their own, by the paths they own; every other path gets OpenAI's.
    error_shapes = ((anthropic.owns, anthropic.error_response), (ollama.owns, ollama.error_response))

    def render_error(error: ApiError) -> Response:
        render = next((render for owns, render in error_shapes if owns(request.path)), error_response)
        return render(error)

    @app.before_request
    def open_record() -> None:
        """The request's id and record (api/request_log.py), before anything can refuse it."""
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        record = RequestRecord(request_id(request.headers.get(REQUEST_ID_HEADER)), request.method, rule,
                               request.blueprint or "none", worker_request=request.environ.get(WORKER_REQUEST))
        current_request.set(record)
        g.record = record

    @app.before_request
    def check_access() -> None:
        policy.check(request.remote_addr, request.path, request.headers.get("Authorization"),
                     request.headers.get("X-Api-Key"), request.query_string.decode("latin-1"))

    @app.after_request
    def tag_worker(response: Response) -> Response:
        response.headers[WORKER_HEADER] = str(os.getpid())
        return response

    @app.after_request
    def account(response: Response) -> Response:
        """Every answer of every route and wire format is counted, logged and tagged here, once."""
        record: RequestRecord | None = g.get("record")
        if record is None:  # a failure before open_record ran
            return response
        record.status = response.status_code
        response.headers[REQUEST_ID_HEADER] = record.id
        meters().requests.labels(record.route, str(record.status), record.wire_format).inc()
        response.call_on_close(lambda: finish_request(record))
        return response

    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError) -> Response:
        return render_error(error)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> Response:
        response = render_error(http_api_error(error))
        if isinstance(error, WerkzeugMethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)  # RFC 9110: a 405 says what is allowed
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render_error(EngineFailure("internal error; see the server log"))

    app.register_blueprint(health.blueprint)
    app.register_blueprint(original.create_blueprint(settings.route))
    app.register_blueprint(openai_chat.blueprint, url_prefix="/v1")
    app.register_blueprint(openai_models.blueprint, url_prefix="/v1")
    app.register_blueprint(responses.blueprint, url_prefix="/v1")
    app.register_blueprint(anthropic.blueprint, url_prefix="/v1")
    app.register_blueprint(v0.blueprint, url_prefix="/v0")
    app.register_blueprint(llm_api.blueprint)
    app.register_blueprint(ollama.blueprint)
    app.register_blueprint(docs_blueprint())
    return app
