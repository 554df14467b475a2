"""Helpers every wire format shares: reading JSON bodies (fields are validated by the models in
api/wire/schemas.py), reaching the worker's runtime and model downloader, and serving
Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from flask import Response, current_app, request

from api.errors import InvalidRequest
from api.model_download import ModelDownloader
from api.runtime import Runtime

T = TypeVar("T")


def runtime() -> Runtime:
    return current_app.extensions["runtime"]


def downloader() -> ModelDownloader:
    return current_app.extensions["downloader"]


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
