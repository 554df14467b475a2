"""The Kubernetes manifests in deploy/kubernetes/: valid against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields rejected, offline), and saying what the daemon needs:
readiness on /ready, liveness on /health, a preStop wait, a grace period above the drain."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from api.config import FIELDS
from api.metrics import meters
from testing.servers import REPO

MANIFESTS = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def default(key: str) -> str:
    return next(field.default for field in FIELDS if field.key == key)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any name lookup or connection is recorded and refused: the validator must work offline."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml"])
def test_each_manifest_is_valid_kubernetes_offline(name: str, no_network: list[object]) -> None:
    for document in documents(MANIFESTS / name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert no_network == []


def test_the_validator_rejects_a_misspelt_field(no_network: list[object]) -> None:
    (deployment,) = documents(MANIFESTS / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def test_the_deployment_probes_drains_and_outlasts_the_graceful_stop() -> None:
    (deployment,) = documents(MANIFESTS / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0].endswith("sleep")
    drain = float(pre_stop[1]) + float(env.get("GRACEFUL_TIMEOUT", default("GRACEFUL_TIMEOUT"))) + float(
        env.get("KILL_TIMEOUT", default("KILL_TIMEOUT")))
    assert pod["terminationGracePeriodSeconds"] > drain
    assert set(env) <= {field.key for field in FIELDS}, "a setting the daemon does not know"
    assert container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_service_and_autoscaler_point_at_the_deployment() -> None:
    (deployment,) = documents(MANIFESTS / "deployment.yaml")
    (service,) = documents(MANIFESTS / "service.yaml")
    (autoscaler,) = documents(MANIFESTS / "hpa.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [metric] = autoscaler["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == meters().clients_waiting.describe()[0].name, "the queue gauge /metrics exports"
