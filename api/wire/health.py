"""GET /health: 503 while the model loads (or failed to), 200 with the model name when ready."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.wire import schemas
from api.wire.common import runtime
from api.wire.operation import Reply, documented

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@documented("Health of this worker (no API key needed)", tags=("Health",),
            description="What supervisors and load balancers probe.",
            responses={200: Reply("The model is loaded.", schemas.Health),
                       503: Reply("The model is loading, or failed to load (`reason`).", schemas.Health,
                                  headers={"Retry-After": "Seconds to wait."})})
def health() -> Response:
    state = runtime()
    body: dict[str, object] = {"status": state.state.value, "model": state.settings.model_name}
    if state.failure:
        body["reason"] = state.failure
    response = jsonify(body)
    if not state.ready:
        response.status_code = 503
        response.headers["Retry-After"] = "1"
    return response
