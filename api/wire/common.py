"""Helpers every wire format shares: reading JSON bodies and fields with 400s that name the
field, reaching the worker's runtime, and serving Server-Sent Events."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from flask import Response, current_app, request

from api.errors import InvalidRequest
from api.runtime import Runtime

T = TypeVar("T")
_MISSING = object()


def runtime() -> Runtime:
    return current_app.extensions["runtime"]


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    data = request.get_data(cache=True)
    if not data:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _type_name(expected: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
             dict: "an object"}
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def get_field(body: dict[str, Any], name: str, expected: type | tuple[type, ...], default: Any = _MISSING,
              *, required: bool = False, nullable: bool = True) -> Any:
    """Read body[name] checked against `expected`. A JSON null counts as absent when nullable."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if required:
            raise InvalidRequest(f"'{name}' is required", param=name)
        return None if default is _MISSING else default
    kinds = expected if isinstance(expected, tuple) else (expected,)
    is_bool = isinstance(value, bool)
    ok = any(
        (kind is bool and is_bool)
        or (kind is int and isinstance(value, int) and not is_bool)
        or (kind is float and isinstance(value, (int, float)) and not is_bool and math.isfinite(value))
        or (kind not in (bool, int, float) and isinstance(value, kind))
        for kind in kinds
    )
    if not ok:
        raise InvalidRequest(f"'{name}' must be {_type_name(expected)}", param=name)
    return float(value) if float in kinds and int not in kinds and not is_bool else value


def get_text(body: dict[str, Any], name: str, *, required: bool = False, allow_empty: bool = True,
             default: str | None = None) -> str | None:
    value = get_field(body, name, str, default, required=required)
    if value is not None and not allow_empty and not value.strip():
        raise InvalidRequest(f"'{name}' must not be empty", param=name)
    return value


def get_stop(body: dict[str, Any], name: str = "stop", limit: int = 16) -> tuple[str, ...]:
    """`stop` as a string or a list of strings (OpenAI allows up to 4; we allow a few more)."""
    value = get_field(body, name, (str, list))
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if len(stops) > limit or not all(isinstance(stop, str) for stop in stops):
        raise InvalidRequest(f"'{name}' must be a string or a list of at most {limit} strings", param=name)
    return tuple(stop for stop in stops if stop)


def client_disconnected() -> Callable[[], bool]:
    """waitress tells us when the client has gone (it needs channel_request_lookahead > 0)."""
    check = request.environ.get("waitress.client_disconnected")
    return check if callable(check) else (lambda: False)


def sse_response(events: Iterable[str]) -> Response:
    """Server-Sent Events, unbuffered end to end (X-Accel-Buffering stops nginx from buffering)."""
    return Response(events, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse_event(payload: object) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def closing(iterator: Iterator[T], on_close: Callable[[], None]) -> Iterator[T]:
    """Yield from iterator and always call on_close, even when the client goes away mid-way."""
    try:
        yield from iterator
    finally:
        on_close()
