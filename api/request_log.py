"""Request ids and the per-request record behind the access log and the JSON log format.

The request id is the client's `X-Request-Id` when it is a sane one (printable ASCII without
spaces, at most MAX_REQUEST_ID characters: it goes into headers and log lines verbatim), else a
new one. The `RequestRecord` of the request being served lives in a context variable, so the
generation service fills in tokens and timings without the wire adapters passing it along.

Flask-free: the supervisor's fallback uses `request_id` too.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
_VALID_ID = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID}}}")

access_log = logging.getLogger("api.access")


def request_id(offered: str | None) -> str:
    """The client's id if it is valid, else a new one."""
    if offered and _VALID_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    """What the access log line of one request says."""

    id: str
    method: str
    route: str
    wire_format: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float | None = None
    first_token_seconds: float | None = None
    worker_request: object = field(default=None, repr=False)
    """The worker's handle for this request (api.app.WORKER_REQUEST), opaque here: the generation
    service passes it to the InferenceObserver. None outside a worker. Not logged."""

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fields(self) -> dict[str, object]:
        """The record as the JSON log's fields (durations in seconds)."""
        out: dict[str, object] = {"request_id": self.id, "method": self.method, "route": self.route,
                                  "wire_format": self.wire_format, "status": self.status,
                                  "duration_seconds": round(self.elapsed(), 6)}
        if self.prompt_tokens or self.completion_tokens:
            out.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        if self.queue_seconds is not None:
            out["queue_wait_seconds"] = round(self.queue_seconds, 6)
        if self.first_token_seconds is not None:
            out["time_to_first_token_seconds"] = round(self.first_token_seconds, 6)
        return out


current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("request_record", default=None)


def current_record() -> RequestRecord | None:
    return current.get()


def log_access(record: RequestRecord) -> None:
    """The access-log line of a finished request (its fields ride along for the JSON format)."""
    tokens = f" tokens={record.prompt_tokens}+{record.completion_tokens}" if record.completion_tokens else ""
    access_log.info("%s %s %d %.1f ms%s id=%s", record.method, record.route, record.status,
                    record.elapsed() * 1000, tokens, record.id, extra={"fields": record.fields()})


def iso_time(created: float) -> str:
    """A log record's time for JSON lines: UTC, ISO 8601, milliseconds."""
    return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, worker, pid, logger, message, and a request's fields
    (the access log's, or the request id of any line logged while serving one)."""

    def __init__(self, worker: str, pid: int) -> None:
        super().__init__()
        self.worker = worker
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname, "worker": self.worker, "pid": self.pid, "logger": record.name,
            "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        else:
            serving = current.get()
            if serving is not None:
                line["request_id"] = serving.id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)
