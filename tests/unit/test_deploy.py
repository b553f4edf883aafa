"""Deployment files: the compose file names its services; KubeRay objects match the v1.7.0 CRDs
(their schemas are test data in tests/data/kuberay)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "tests" / "data" / "kuberay"


def test_compose_names_the_services() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "api"} <= set(compose["services"])
    assert "postgresql" in compose["services"]["mlflow"]["command"]  # MLflow on Postgres
    assert compose["services"]["api"]["environment"]["ORCHESTRA_DATABASE_URL"].startswith("postgresql+psycopg://")
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert any(line.startswith("FROM python:3.11") for line in dockerfile)
    assert dockerfile[-1].startswith("CMD") and '"orchestra"' in dockerfile[-1]


def test_no_default_secret_in_compose_or_manifests() -> None:
    """Every secret is required from the environment (compose refuses to start without it, with
    the message) or read from a Kubernetes Secret; none is written into a file."""
    import re

    text = (ROOT / "docker-compose.yml").read_text()
    for name in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "ORCHESTRA_API_TOKENS"):
        uses = re.findall(r"\$\{" + name + r"(:?[-?=+]?)[^}]*\}", text)
        assert uses and uses[0] == ":?", (name, uses)  # first use: required, with a message
    assert not re.search(r"://\w+:(?!\$\{)[^@/]+@", text)  # no literal password in a URL
    for path in ("deploy/k8s/api.yaml", "deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob-example.yaml"):
        for doc in yaml.safe_load_all((ROOT / path).read_text()):
            for key, value in _walk(doc):
                if re.search(r"token|password|secret", key, re.I) and isinstance(value, str):
                    raise AssertionError(f"{path}: {key} holds a literal value")


def _walk(node: object, key: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict):
        if "name" in node and "value" in node:  # a container's env entry
            return [(str(node["name"]), node["value"])]
        return [kv for k, v in node.items() for kv in _walk(v, str(k))]
    if isinstance(node, list):
        return [kv for item in node for kv in _walk(item, key)]
    return [(key, node)]


def crd_schema(kind: str) -> dict:  # type: ignore[type-arg]
    return json.loads((CRDS / f"{kind}.v1.schema.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("path", "kind"), [("deploy/kuberay/raycluster.yaml", "rayclusters"),
                                            ("deploy/kuberay/rayjob-example.yaml", "rayjobs")])
def test_kuberay_manifests_validate(path: str, kind: str) -> None:
    doc = yaml.safe_load((ROOT / path).read_text())
    jsonschema.validate(doc, crd_schema(kind))
    broken = dict(doc, spec={**doc["spec"], "headGroupSpec" if kind == "rayclusters" else "entrypoint": 5})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schema(kind))


def test_k8s_manifests_parse() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/api.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
