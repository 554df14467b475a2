"""Which error shape a request path gets, without Flask: the workers' app and the supervisor's
503 fallback answer the same path in the same shape (Anthropic's under /v1/messages, Ollama's
under / and /api/, OpenAI's everywhere else)."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError

ANTHROPIC_PATH = "/v1/messages"

# Anthropic's error type for each status (https://docs.anthropic.com/en/api/errors); 503 is ours for
# "the model is loading or busy", which Anthropic calls overloaded (its own status for that is 529).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 504: "timeout_error",
}


def anthropic_owns(path: str) -> bool:
    """Whether a request path belongs to Anthropic's interface, and so gets its errors in Anthropic's shape."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_error_body(error: ApiError) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def ollama_owns(path: str) -> bool:
    """Whether a request path belongs to Ollama's interface, and so gets its errors in Ollama's shape."""
    return path == "/" or path.startswith("/api/")


def ollama_error_body(error: ApiError) -> dict[str, Any]:
    return {"error": error.message}


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    """`error` in the shape of the interface that owns `path`."""
    if anthropic_owns(path):
        return anthropic_error_body(error)
    if ollama_owns(path):
        return ollama_error_body(error)
    return error.to_dict()
