"""The REST API on SQLite with in-memory Ray/MLflow stand-ins: contract, errors, auth, limits.
The same checks run against PostgreSQL in tests/integration/test_postgres.py."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from service.db import DatabaseNotMigrated, engine_for, require_migrated
from service.tracking import Tracker
from tests.api_harness import make_client
from tests.fakes import MemoryLauncher
from tests.unit.test_spec import BAD

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUICKSTART = (EXAMPLES / "quickstart.yaml").read_text()


@pytest.fixture()
def client(tmp_path: Path) -> TestClient:
    return make_client(f"sqlite:///{tmp_path / 'api.db'}")


def count(client: TestClient) -> int:
    n, after = 0, None
    while True:
        page = client.get("/v1/experiments", params={"limit": 500, **({"after": after} if after else {})}).json()
        n += len(page["items"])
        after = page["next"]
        if not after:
            return n


def run_contract(client: TestClient) -> None:
    """Shared by the SQLite and PostgreSQL suites."""
    r = client.post("/v1/experiments", content=QUICKSTART, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    exp = r.json()
    assert exp["status"] == "queued" and len(exp["runs"]) == 1
    assert exp["runs"][0]["status"] == "queued" and exp["runs"][0]["mlflow_run_id"] is None
    assert exp["spec"]["train"]["precision"] == "fp32"  # resolved spec, defaults filled in
    assert client.get(f"/v1/experiments/{exp['id']}").json()["id"] == exp["id"]
    run_id = exp["runs"][0]["id"]
    assert client.get(f"/v1/runs/{run_id}").json()["experiment_id"] == exp["id"]
    # JSON works too, and the same idempotency key returns the same experiment.
    body = json.dumps(yaml.safe_load(QUICKSTART))
    a = client.post("/v1/experiments", content=body, headers={"Idempotency-Key": "abc"})
    b = client.post("/v1/experiments", content=body, headers={"Idempotency-Key": "abc"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] == b.json()["id"]
    assert b.headers["Idempotent-Replayed"] == "true"
    other = json.dumps({**yaml.safe_load(QUICKSTART), "name": "other"})
    assert client.post("/v1/experiments", content=other, headers={"Idempotency-Key": "abc"}).status_code == 409
    assert count(client) == 2
    before = count(client)
    for _, doc, field, _msg in BAD:
        r = client.post("/v1/experiments", content=json.dumps(doc))
        assert r.status_code == 422, (field, r.text)
        assert any(d["field"] == field for d in r.json()["detail"]), (field, r.json())
    for raw, ctype in (("{oops", "application/json"), ("[]", "application/json"), ("a: [", "application/yaml"),
                       (b"\xff\xfe", "application/json")):
        r = client.post("/v1/experiments", content=raw, headers={"Content-Type": ctype})
        assert r.status_code == 400, r.text
        assert r.json()["detail"][0]["field"] == "body"
    assert count(client) == before
    # Pagination.
    for i in range(3):
        client.post("/v1/experiments", content=json.dumps({**yaml.safe_load(QUICKSTART), "name": f"p{i}"}))
    page1 = client.get("/v1/experiments", params={"limit": 2}).json()
    page2 = client.get("/v1/experiments", params={"limit": 2, "cursor": page1["next"]}).json()
    assert client.get("/v1/experiments", params={"limit": 2, "after": page1["next"]}).json() == page2
    names = [e["name"] for e in page1["items"] + page2["items"]]
    assert names[:3] == ["p2", "p1", "p0"] and len(set(e["id"] for e in page1["items"] + page2["items"])) == 4
    assert client.get("/v1/experiments", params={"limit": 0}).status_code == 422
    assert client.get("/v1/experiments/nope").status_code == 404
    assert client.get("/v1/runs/nope").status_code == 404
    for bad in ("%00", "a%00b", "0" * 31 + "%00"):  # NUL never reaches the database
        assert client.get(f"/v1/experiments/{bad}").status_code == 404
        assert client.get(f"/v1/runs/{bad}/logs").status_code == 404
        assert client.post(f"/v1/experiments/{bad}/cancel").status_code == 404
        assert client.get(f"/v1/experiments?cursor={bad}").status_code == 400


def test_contract_on_sqlite(client: TestClient) -> None:
    run_contract(client)


def test_large_body_is_413_and_stores_nothing(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", max_body=64 * 1024)
    big = json.dumps({**yaml.safe_load(QUICKSTART), "description": "x" * (5 * 1024 * 1024)})
    r = client.post("/v1/experiments", content=big)
    assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body"

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b" " * 4096

    assert client.post("/v1/experiments", content=chunks()).status_code == 413
    assert count(client) == 0


def test_tokens_guard_everything_but_health(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", tokens="s3cret,other")
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    for path in ("/v1/experiments", "/v1/info", "/v1/runs/x"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/experiments", content=QUICKSTART).status_code == 401
    ok = {"Authorization": "Bearer other"}
    assert client.get("/v1/experiments", headers=ok).status_code == 200
    assert client.get("/v1/info", headers=ok).json()["ray_dashboard_url"]


def test_readyz_names_the_missing_dependency(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", launcher=MemoryLauncher(fail_submit=True))
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["unavailable"] == ["ray"]


def test_readyz_is_bounded_when_mlflow_hangs(tmp_path: Path) -> None:
    """An MLflow that accepts connections and never answers: /readyz answers 503 within about a
    second, says only which dependency is down, and 100 concurrent probes leave GET and POST
    answering (the probes never take the request thread pool)."""
    with socket.socket() as hole:  # a listening socket nobody reads: every request hangs
        hole.bind(("127.0.0.1", 0))
        hole.listen(256)
        tracker = Tracker(f"http://127.0.0.1:{hole.getsockname()[1]}")
        client = make_client(f"sqlite:///{tmp_path / 'a.db'}", tracker=tracker)
        t0 = time.monotonic()
        r = client.get("/readyz")
        assert time.monotonic() - t0 < 3.0  # the check's own bound is 0.8 s; slack for a loaded machine
        assert r.status_code == 503 and r.json()["unavailable"] == ["mlflow"]
        assert "127.0.0.1" not in r.text and "Timeout" not in r.text  # nothing internal told

        def probe(_: int) -> int:
            return client.get("/readyz").status_code

        with ThreadPoolExecutor(max_workers=100) as pool:
            probes = [pool.submit(probe, i) for i in range(100)]
            time.sleep(0.2)
            t0 = time.monotonic()
            assert client.get("/v1/experiments").status_code == 200
            assert client.post("/v1/experiments", content=QUICKSTART,
                               headers={"Content-Type": "application/yaml"}).status_code == 201
            assert time.monotonic() - t0 < 5.0  # unbounded, these waited behind 100 probes for minutes
            assert {p.result(timeout=30) for p in probes} == {503}


def test_cancel_and_logs(tmp_path: Path) -> None:
    launcher = MemoryLauncher()
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", launcher=launcher)
    exp = client.post("/v1/experiments", content=QUICKSTART, headers={"Content-Type": "application/yaml"}).json()
    state = client.app.state.orchestra  # type: ignore[attr-defined]
    from service.scheduler import Scheduler

    Scheduler(state.sessions, launcher, state.tracker, max_concurrent=2, storage_path="/tmp").tick()
    run_id = exp["runs"][0]["id"]
    logs = client.get(f"/v1/runs/{run_id}/logs", params={"tail": 1}).json()
    assert logs["logs"] == "Traceback: boom"
    r = client.post(f"/v1/experiments/{exp['id']}/cancel")
    assert r.status_code == 202 and r.json()["runs"][0]["cancel_requested"] is True


def test_unmigrated_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'raw.db'}"
    with pytest.raises(DatabaseNotMigrated, match="orchestra db upgrade"):
        require_migrated(engine_for(url), url)


def test_openapi_is_served(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/experiments", "/v1/experiments/{experiment_id}", "/v1/experiments/{experiment_id}/cancel",
                 "/v1/runs/{run_id}", "/v1/runs/{run_id}/logs", "/v1/info", "/healthz", "/readyz"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_openapi_declares_the_spec_errors_and_bearer(client: TestClient) -> None:
    """The submission body is the spec's schema (JSON and YAML), every error status carries the
    one error body the API answers, and the bearer scheme is declared."""
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/v1/experiments"]["post"]
    content = post["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ExperimentSpec"}
    assert content["application/yaml"]["schema"]["type"] == "string"
    spec = doc["components"]["schemas"]["ExperimentSpec"]
    assert {"name", "task"} <= set(spec["required"]) and "optimizer" in spec["properties"]
    assert "AdamWConfig" in doc["components"]["schemas"]  # the optimizer union's members are there
    assert set(post["responses"]) >= {"201", "400", "401", "409", "413", "422", "503"}
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")) and path != "/readyz":
                    assert response["content"]["application/json"]["schema"] == error, (path, code)
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_every_error_has_the_declared_body(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'a.db'}", tokens="t1")
    auth = {"Authorization": "Bearer t1"}
    for response, field in [(client.get("/v1/experiments"), "authorization"),
                            (client.get("/v1/experiments/" + "0" * 32, headers=auth), "experiment_id"),
                            (client.get("/v1/runs/nope", headers=auth), "run_id"),
                            (client.get("/v1/experiments", params={"cursor": "f" * 32}, headers=auth), "cursor"),
                            (client.get("/nowhere", headers=auth), "request")]:
        assert response.status_code in (400, 401, 404), response.text
        assert response.json() == {"detail": [{"field": field, "message": response.json()["detail"][0]["message"]}]}


def test_idempotency_compares_the_resolved_spec(client: TestClient) -> None:
    """The same spec resent with a default written out is the same submission, not a 409."""
    first = client.post("/v1/experiments", content=QUICKSTART, headers={"Content-Type": "application/yaml",
                                                                         "Idempotency-Key": "k1"})
    doc = yaml.safe_load(QUICKSTART)
    doc["priority"] = 0  # the default, now written out
    again = client.post("/v1/experiments", json=doc, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    doc["priority"] = 5
    other = client.post("/v1/experiments", json=doc, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["detail"][0]["field"] == "Idempotency-Key"
