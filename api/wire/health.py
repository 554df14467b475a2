"""GET /health (this worker is up; `?deep=1` also runs a real one-token generation), GET /ready
(a request sent now would be served, or would wait in line, rather than be refused) and GET
/metrics (the whole service's, in Prometheus' text format: api/metrics.py)."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request

from api.access import is_deep_check
from api.errors import ApiError
from api.generation import GenerationRequest
from api.metrics import CONTENT_TYPE, exposition
from api.sampling import SamplingParams
from api.wire import schemas
from api.wire.common import client_disconnected, runtime
from api.wire.operation import Reply, documented

blueprint = Blueprint("health", __name__)

DEEP_CHECK_DEADLINE = 10.0
"""Seconds the deep check may take in all (waiting for a slot included) before it counts as failed."""
DEEP_CHECK_PROMPT = "ping"


@blueprint.get("/health")
@documented("Health of this worker (no API key needed, except with `?deep=1`)", tags=("Health",),
            description="What supervisors and load balancers probe. With `?deep=1` (which needs the API key when "
                        "one is set) it also runs a real one-token generation within 10 s: it waits in line for an "
                        "inference slot like any request and counts as one (with restart-per-request, the worker "
                        "that ran it is replaced, so no client meets a model that generated before).",
            responses={200: Reply("The model is loaded (and, deep, generated a token).", schemas.Health),
                       503: Reply("The model is loading, failed to load, or the deep check failed (`reason`).",
                                  schemas.Health, headers={"Retry-After": "Seconds to wait."})})
def health() -> Response:
    state = runtime()
    body: dict[str, object] = {"status": state.state.value, "model": state.settings.model_name}
    if state.failure:
        body["reason"] = state.failure
    if state.ready and is_deep_check(request.path, request.query_string.decode("latin-1")):
        return deep_check(body)
    return jsonify(body) if state.ready else unavailable(body, retry_after=1)


def deep_check(body: dict[str, object]) -> Response:
    """One real token from the model, within DEEP_CHECK_DEADLINE, through the same service and line
    as every request."""
    started = time.monotonic()
    try:
        generation = runtime().service.start(GenerationRequest(
            SamplingParams(max_tokens=1, temperature=0), prompt=DEEP_CHECK_PROMPT,
            is_disconnected=client_disconnected(), deadline=DEEP_CHECK_DEADLINE))
        generation.text()
    except ApiError as error:
        return unavailable({**body, "status": "failed", "reason": f"the deep check failed: {error.message}"},
                           retry_after=error.retry_after or 1)
    seconds = time.monotonic() - started
    tokens = generation.outcome.completion_tokens if generation.outcome else 0
    return jsonify({**body, "deep": {"seconds": round(seconds, 4), "tokens": tokens}})


@blueprint.get("/ready")
@documented("Whether a request sent now would be served (no API key needed)", tags=("Health",),
            description="200 while this worker would take a generation request now: a slot is free, or there is room "
                        "in line (MAX_QUEUE). 503 with the reason otherwise: loading, the model failed to load, every "
                        "slot busy with the line full, or the service stopping. While no worker can take a client, the "
                        "supervisor answers it the same way.",
            responses={200: Reply("A request sent now would be served or wait in line.", schemas.Readiness),
                       503: Reply("It would be refused (`reason`).", schemas.Readiness,
                                  headers={"Retry-After": "Seconds to wait."})})
def ready() -> Response:
    state = runtime()
    reason = state.not_ready_because()
    queue = state.service.slots.queue
    waiting = len(queue.live_tickets()) if queue is not None else 0
    if not reason:
        return jsonify({"status": "ready", "waiting": waiting})
    return unavailable({"status": "unavailable", "reason": reason, "waiting": waiting},
                       retry_after=queue.retry_after(waiting) if queue is not None else 1)


def unavailable(body: dict[str, object], *, retry_after: int) -> Response:
    """A 503 of the health routes: their own body (not an API error's), with when to ask again."""
    response = jsonify(body)
    response.status_code = 503
    response.headers["Retry-After"] = str(retry_after)
    return response


@blueprint.get("/metrics")
@documented("Prometheus metrics of the whole service (the API key, unless METRICS_PUBLIC=true)", tags=("Health",),
            description="Every worker's counters and histograms, the dead ones' included, and the supervisor's gauges, "
                        "in the Prometheus text format. The README lists the metrics.",
            responses={200: Reply("The metrics.", str, media_type="text/plain")})
def metrics() -> Response:
    return Response(exposition(), content_type=CONTENT_TYPE)
