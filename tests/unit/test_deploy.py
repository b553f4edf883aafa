"""Deployment files: the compose file names its services; KubeRay objects match the v1.7 CRDs."""

from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = next((p for p in (ROOT.parent / "shared" / "kuberay-crds", Path("/work/shared/kuberay-crds"))
             if p.exists()), ROOT.parent / "shared" / "kuberay-crds")  # beside the checkout, or the workplace's


def test_compose_names_the_services() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "api"} <= set(compose["services"])
    assert "postgresql" in compose["services"]["mlflow"]["command"]  # MLflow on Postgres
    assert compose["services"]["api"]["environment"]["ORCHESTRA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert (ROOT / "Dockerfile").read_text().startswith("#")


def crd_schema(kind: str) -> dict:  # type: ignore[type-arg]
    crd = yaml.load((CRDS / f"ray.io_{kind}.yaml").read_text(), Loader=yaml.CSafeLoader)
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return v1["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/kuberay-crds not beside the checkout")
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
