"""The deployment files (deploy/): Kubernetes manifests validated offline against the API schemas,
and the compose file's promises (GPU per worker, PostgreSQL health, no default secrets).

The end-to-end container test is deploy/test.sh (needs root and Docker; run by .ci/run when
MURALIST_DEPLOY_TEST=1)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30"


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (it is in the test extra: pip install -e '.[test]')")
    return kubernetes_validate


def test_manifests_are_valid_kubernetes_objects() -> None:
    kv = _validator()
    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"}
    for name, doc in docs:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")


def test_validation_catches_a_misspelled_field() -> None:
    # Guards the test above: strict validation must reject what kubectl would.
    kv = _validator()
    api = next(d for _, d in _manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "muralist")
    container = api["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(api, K8S_VERSION, strict=True)


def test_workers_get_a_gpu_and_the_api_a_readiness_probe() -> None:
    deployments = {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == "Deployment"}
    worker = deployments["muralist-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    api = deployments["muralist"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_reserves_a_gpu_for_every_gpu_service() -> None:
    services = _compose()["services"]
    for name in ("single", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1, name
    assert "deploy" not in services["worker-cpu"]


def test_compose_waits_for_a_healthy_postgres_over_tcp() -> None:
    services = _compose()["services"]
    check = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in check and "-h 127.0.0.1" in check
    assert services["muralist"]["depends_on"]["postgres"]["condition"] == "service_healthy"


COMPOSE_FILES = sorted(DEPLOY.glob("compose*.yaml"))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_has_no_default_secrets(path: Path) -> None:
    text = path.read_text()
    # Each secret is required (${VAR:?message}) or empty by default, never a usable value.
    for var in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"):
        for default in re.findall(r"\$\{" + var + r"(:?[-?][^}]*)?\}", text):
            assert default == "" or default.startswith(":?"), f"{var} has a default: {default}"
    if "MURALIST_ADMIN_KEY" in text:
        assert re.search(r"MURALIST_ADMIN_KEY: \$\{MURALIST_ADMIN_KEY:-\}", text)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_host_network_services_publish_no_ports(path: Path) -> None:
    # Docker refuses to create a host-network container with published ports (the multi-box
    # API box once inherited compose.yaml's ports through an override and could not start).
    services = yaml.safe_load(path.read_text())["services"]  # YAML merge keys (<<: *x) resolved
    for name, service in services.items():
        if service.get("network_mode") == "host":
            assert not service.get("ports"), f"{path.name}: {name} uses the host network and publishes ports"
    env_example = (DEPLOY / "env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", env_example, re.M) and re.search(r"^RAY_AUTH_TOKEN=$", env_example, re.M)
