"""One hierarchy of API errors; each wire format renders them in its own shape.

The fields follow OpenAI's error object (`message`, `type`, `param`, `code`) because it is the
richest of the formats we speak; the other adapters pick what they need. Messages are written for
the client and never contain a stack trace or a local path.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """The HTTP headers that go with this error in every wire format (and the supervisor's fallback)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(ApiError):
    """Malformed JSON, a wrong type, a missing field, an out-of-range value: 400."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        """RFC 9110: a 401 names the scheme it wants (the key also works as X-Api-Key)."""
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class DownloadDisabled(Forbidden):
    code = "download_disabled"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestHeadersTooLarge(ApiError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class UnsupportedTransferEncoding(ApiError):
    """A Transfer-Encoding other than chunked: the server cannot read the body (501)."""

    status = 501
    type = "invalid_request_error"
    code = "unsupported_transfer_encoding"


class ServiceUnavailable(ApiError):
    """The model is loading, or no worker can serve: try again later (503 + Retry-After)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(message, retry_after=retry_after, code=code)


class GenerationTimeout(ApiError):
    """A generation ran past its time limit or stopped making progress: 504."""

    status = 504
    type = "server_error"
    code = "timeout"


class EngineFailure(ApiError):
    """The engine reported an error we cannot blame on the request."""

    status = 500
    type = "server_error"
    code = "engine_error"


class DownloadFailed(ApiError):
    """The model or catalog server failed us (bad status, truncated, wrong checksum): 502."""

    status = 502
    type = "server_error"
    code = "download_failed"


class DownloadTimeout(DownloadFailed):
    status = 504
    code = "download_timeout"


class InsufficientStorage(ApiError):
    status = 507
    type = "server_error"
    code = "insufficient_storage"


class ModelLoadFailed(EngineFailure):
    """An installed model that the client named correctly failed to load: its file is at fault."""

    code = "model_load_failed"


class QueueFull(ServiceUnavailable):
    """Every inference slot is taken and MAX_QUEUE clients already wait: 503 at once."""

    code = "queue_full"


class QueueTimeout(ServiceUnavailable):
    """The client waited QUEUE_TIMEOUT for a slot: 503."""

    code = "queue_timeout"


class ClientLeft(ApiError):
    """The client closed its connection while it waited: nobody reads this answer (nginx's 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"
