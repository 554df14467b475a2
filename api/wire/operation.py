"""What a route says about itself: the `documented` decorator, its `Reply`s and the errors shared
by every generating route. api/openapi.py reads these to build the document; keeping them here lets
the wire modules describe their routes without importing the document builder above them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from api.wire.schemas import ErrorResponse

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Reply:
    """One documented response. `model` is a pydantic model or any type pydantic can describe."""

    description: str
    model: Any = None
    media_type: str = "application/json"
    events: Any = None
    """For text/event-stream: the schema of each event's JSON data; for application/x-ndjson: of each line
    (in `x-event-data`)."""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    summary: str
    tags: tuple[str, ...]
    responses: Mapping[int, Reply | tuple[Reply, ...]]
    request: type[BaseModel] | None = None
    description: str = ""
    errors: Mapping[int, str] = field(default_factory=dict)
    """Error statuses of this route beyond the ones every route may answer."""
    path_params: Mapping[str, str] = field(default_factory=dict)
    error_model: type[BaseModel] = ErrorResponse


def documented(summary: str, *, tags: tuple[str, ...], responses: Mapping[int, Reply | tuple[Reply, ...]],
               request: type[BaseModel] | None = None, description: str = "",
               errors: Mapping[int, str] | None = None, path_params: Mapping[str, str] | None = None,
               error_model: type[BaseModel] = ErrorResponse) -> Callable[[F], F]:
    """Attach the OpenAPI description of a view. Put it under the route decorators."""
    operation = Operation(summary, tags, responses, request, description, errors or {}, path_params or {}, error_model)

    def attach(view: F) -> F:
        view.openapi = operation  # type: ignore[attr-defined]
        return view

    return attach


def operation_of(view: Callable[..., Any]) -> Operation | None:
    return getattr(view, "openapi", None)


GENERATION_ERRORS = {
    404: "The model is not installed (`code`: model_not_found; the message lists the installed ones).",
    503: "The model is loading or busy; retry after `Retry-After` seconds.",
    504: "The generation ran over REQUEST_TIMEOUT or stalled for STALL_TIMEOUT.",
}
"""How every route that generates can fail besides bad input: one text each, for every interface."""
