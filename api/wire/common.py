"""Helpers every wire format shares: reading JSON bodies (fields are validated by the models in
api/wire/schemas.py), reaching the worker's runtime and model downloader, and serving
Server-Sent Events."""

from __future__ import annotations

import dataclasses
import errno
import json
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from flask import Response, current_app, jsonify, request

from api.errors import ApiError, InvalidRequest
from api.model_download import ModelDownloader
from api.runtime import Runtime
from api.sampling import SamplingParams
from api.wire.validation import field_path

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
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply to be read as JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    refuse_lone_surrogates(body)
    return body


def refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """A 400 for a string that is not Unicode text. JSON may spell half of a UTF-16 pair alone
    (`"\\ud800"`), and Python parses it into a string that no UTF-8 encoder accepts: deep in the
    engine or the response writer, that was a UnicodeEncodeError and a 500. The message names the
    field but never repeats the bad text (it could not be sent either)."""
    found = _lone_surrogate(body)
    if found is None:
        return
    path, in_key = found
    param = field_path(path) or None
    # A string always sits under some field (the body is an object); a key may be at the top.
    where = (f"a field name in '{param}'" if param else "a field name") if in_key else f"'{param}'"
    raise InvalidRequest(f"{where} is not valid Unicode text: it holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)",
                         param=param)


def _lone_surrogate(value: Any) -> tuple[tuple[int | str, ...], bool] | None:
    """(path, in a key?) of the first string or object key holding a lone surrogate, or None.
    Iterative: the body may be nested as deeply as the JSON parser allows."""
    pending: list[tuple[tuple[int | str, ...], Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if not _is_unicode_text(item):
                return path, False
        elif isinstance(item, dict):
            if not all(_is_unicode_text(key) for key in item):
                return path, True
            pending.extend(((*path, key), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
    return None


def _is_unicode_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def client_disconnected() -> Callable[[], bool]:
    """A check for a client that has gone away.

    waitress notices a closed connection only when its loop reads or writes it, and it stops reading
    while a response still has bytes waiting to be sent: a streaming client that stopped reading and
    then closed its socket went unnoticed, and its generation ran on with the inference slot taken.
    So besides waitress's own flag, the check asks the kernel: a peek that finds the end of the stream
    or a reset means nobody is listening. A peek takes nothing, so a pipelined request stays queued.
    """
    check = request.environ.get("waitress.client_disconnected")
    if not callable(check):
        return lambda: False
    sock = getattr(getattr(check, "__self__", None), "socket", None)
    if not isinstance(sock, socket.socket):
        return check
    return lambda: check() or socket_closed_by_peer(sock)


_PEER_GONE = {errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ENOTCONN, errno.EBADF}


def socket_closed_by_peer(sock: socket.socket) -> bool:
    """True when the other end has closed or reset the connection (waitress keeps its sockets
    non-blocking, and MSG_DONTWAIT says so again where it exists)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing sent: the client is still there
    except OSError as error:
        return error.errno in _PEER_GONE or sock.fileno() < 0


def error_reply(error: ApiError, body: object) -> Response:
    """An error as a response: its status and headers (Retry-After, WWW-Authenticate), with the body in a
    wire format's own shape."""
    response = jsonify(body)
    response.status_code = error.status
    response.headers.update(error.headers())
    return response


def sampling_from(body: object, renamed: Mapping[str, str] | None = None, **derived: Any) -> SamplingParams:
    """The sampling values a request model carries, as the service takes them.

    Each value is read from the body under its own name or under the wire format's name for it
    (`renamed`, e.g. {"temperature": "temp"}); `derived` gives values the wire format computes.
    A value the body does not have keeps SamplingParams' default.
    """
    names = renamed or {}
    values = {field.name: getattr(body, names.get(field.name, field.name)) for field in dataclasses.fields(SamplingParams)
              if hasattr(body, names.get(field.name, field.name))}
    return SamplingParams(**{**values, **derived})


def is_token_ids(value: object) -> bool:
    """Whether a prompt or input field holds token ids (a list of integers, or a list of such lists)
    as OpenAI's API allows: they are ids of a tokenizer of the client's choosing, which the server
    cannot know, so the routes refuse them with code token_ids_not_supported."""
    def ids(item: object) -> bool:
        return isinstance(item, list) and bool(item) and all(isinstance(i, int) and not isinstance(i, bool) for i in item)

    return ids(value) or (isinstance(value, list) and bool(value) and all(ids(item) for item in value))


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A `stop` field as every wire format sends it (one string, a list, or nothing), empty ones dropped."""
    stops = [stop] if isinstance(stop, str) else (stop or [])
    return tuple(text for text in stops if text)


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
