"""The Flask application factory: one blueprint per wire format, configuration passed in."""

from __future__ import annotations

import logging
import os

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from api.access import AccessPolicy
from api.config import Settings
from api.errors import ApiError, EngineFailure, MethodNotAllowed, NotFound, PayloadTooLarge
from api.runtime import Runtime

log = logging.getLogger("api.app")

# Routes a supervisor or load balancer probes: no API key needed.
OPEN_PATHS = frozenset({"/health"})
WORKER_HEADER = "X-Worker-Pid"


def error_response(error: ApiError) -> Response:
    response = jsonify(error.to_dict())
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _http_error(error: HTTPException) -> ApiError:
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


def create_app(settings: Settings, runtime: Runtime) -> Flask:
    from api.wire import gpt4all_api, health, openai

    app = Flask("api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # keep the documented field order of each wire format
    app.extensions["runtime"] = runtime
    policy = AccessPolicy(settings.api_key, settings.authorized_urls)

    @app.before_request
    def check_access() -> None:
        policy.check_client(request.remote_addr)
        if request.path not in OPEN_PATHS:
            policy.check_key(request.headers.get("Authorization"), request.headers.get("X-Api-Key"))

    @app.after_request
    def tag_worker(response: Response) -> Response:
        response.headers[WORKER_HEADER] = str(os.getpid())
        return response

    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> Response:
        return error_response(_http_error(error))

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(EngineFailure("internal error; see the server log"))

    app.register_blueprint(health.blueprint)
    app.register_blueprint(gpt4all_api.create_blueprint(settings.route))
    app.register_blueprint(openai.blueprint, url_prefix="/v1")
    return app
