"""Progress without a real MLflow: the sweep's trial count, the rate over a retried attempt, the
bounds (MLflow down, MLflow stalled), the route (404, auth, OpenAPI) and the CLI's words.
tests/integration/test_progress.py reads real MLflow runs and drives the CLI in a terminal."""

import http.server
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from service.domain import Run
from service.models import RunRow
from service.progress import Plan, _rate, experiment_progress
from service.stack import free_port
from service.tracking import Tracker
from tests.api_harness import make_client

QUICKSTART = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text()
SPEC = {"train": {"max_steps": 200}}


def a_run(run_id: str = "a" * 32, status: str = "running", mlflow_run_id: str | None = "m" * 32) -> Run:
    now = datetime.now(UTC)
    return Run(id=run_id, experiment_id="e" * 32, index=0, status=status, mlflow_run_id=mlflow_run_id,
               ray_submission_id=None, error=None, waiting=None, attempt=1, failure_kind=None,
               cancel_requested=False, created_at=now, dispatched_at=None, started_at=None, finished_at=None)


def test_a_sweep_runs_num_samples_times_its_grid() -> None:
    plan = Plan.of({"train": {"max_steps": 50}, "sweep": {
        "num_samples": 3, "metric": "eval/accuracy", "mode": "max",
        "parameters": {"optimizer.lr": {"grid": [0.1, 0.01]}, "train.seed": {"grid": [0, 1, 2]},
                       "optimizer.weight_decay": {"loguniform": [1e-4, 1e-1]}}}})
    assert (plan.trials, plan.max_steps, plan.metric, plan.mode) == (18, 50, "eval/accuracy", "max")
    assert Plan.of(SPEC).trials is None
    assert Plan.of({"merge": {"method": "ties"}}).max_steps is None  # no train section: no step count


def test_the_rate_counts_only_the_current_attempt() -> None:
    # ten steps a second, then a retry from the step-50 checkpoint at two steps a second
    first = [(s, 1000 * s // 10) for s in range(10, 101, 10)]
    again = [(50 + 10 * i, 20_000 + 5000 * i) for i in range(4)]
    assert _rate(first) == pytest.approx(10.0)
    assert _rate(first + again) == pytest.approx(2.0)
    assert _rate(first[:1]) is None and _rate([]) is None
    assert _rate([(s, 100 * s) for s in range(1, 100)]) == pytest.approx(10.0)  # the recent points only


def test_a_run_not_started_is_at_step_zero_without_asking_mlflow() -> None:
    closed = Tracker(f"http://127.0.0.1:{free_port(29991)}")  # nothing there: asking would fail
    [queued] = experiment_progress(closed, SPEC, [a_run(status="queued", mlflow_run_id=None)])
    assert queued.reason is None and queued.progress is not None
    assert (queued.progress.step, queued.progress.max_steps, queued.progress.fraction) == (0, 200, 0.0)
    sweep = {**SPEC, "sweep": {"num_samples": 4, "parameters": {"optimizer.lr": {"choice": [0.1, 0.01]}}}}
    [trials] = experiment_progress(closed, sweep, [a_run(status="queued", mlflow_run_id=None)])
    assert trials.progress is not None and trials.progress.trials is not None
    assert (trials.progress.trials.total, trials.progress.max_steps) == (4, 800)


def test_mlflow_down_gives_null_progress_with_the_reason_at_once() -> None:
    closed = Tracker(f"http://127.0.0.1:{free_port(29992)}")
    start = time.monotonic()
    out = experiment_progress(closed, SPEC, [a_run(), a_run("b" * 32, status="queued", mlflow_run_id=None)])
    assert time.monotonic() - start < 3
    assert out[0].progress is None and out[0].reason is not None and "MLflow does not answer" in out[0].reason
    assert out[1].progress is not None and out[1].progress.step == 0  # the queued one still has its answer


class _Stalled(http.server.BaseHTTPRequestHandler):
    """Answers MLflow's health check, then never answers a read (a server whose database hangs)."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
            return
        self.release.wait(30)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture()
def stalled() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalled)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Stalled.release.set()  # the reads left waiting end, and their threads with them
        server.shutdown()
        server.server_close()


def test_a_stalled_mlflow_is_given_up_after_the_deadline(stalled: str) -> None:
    start = time.monotonic()
    [run] = experiment_progress(Tracker(stalled), SPEC, [a_run()], timeout_s=0.5)
    assert time.monotonic() - start < 2
    assert run.progress is None and run.reason == "MLflow did not answer within 0.5 s"


# ---- the route --------------------------------------------------------------------------------


def submit(client: TestClient) -> dict:  # type: ignore[type-arg]
    r = client.post("/v1/experiments", content=QUICKSTART, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_the_route_answers_each_run_and_404_for_an_unknown_experiment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    client = make_client(url)
    exp = submit(client)
    body = client.get(f"/v1/experiments/{exp['id']}/progress").json()
    assert body["experiment_id"] == exp["id"] and body["status"] == "queued"
    [run] = body["runs"]
    assert run["run_id"] == exp["runs"][0]["id"] and run["status"] == "queued" and run["reason"] is None
    assert run["progress"]["step"] == 0 and run["progress"]["max_steps"] == 200

    # a run with an MLflow run that cannot be read: null with the reason, not a 5xx
    from service.db import engine_for, session_factory

    with session_factory(engine_for(url))() as session:
        row = session.get(RunRow, run["run_id"])
        assert row is not None
        row.mlflow_run_id = "f" * 32
        session.commit()
    r = client.get(f"/v1/experiments/{exp['id']}/progress")
    assert r.status_code == 200 and r.json()["runs"][0]["progress"] is None
    assert r.json()["runs"][0]["reason"].startswith("MLflow")

    for unknown in ("0" * 32, "not-an-id"):
        r = client.get(f"/v1/experiments/{unknown}/progress")
        assert r.status_code == 404 and r.json()["detail"][0]["field"] == "experiment_id"


def test_the_route_needs_a_token_and_is_in_the_openapi_document(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'api.db'}", tokens="secret-token")
    exp = client.post("/v1/experiments", json=yaml.safe_load(QUICKSTART),
                      headers={"Authorization": "Bearer secret-token"}).json()
    assert client.get(f"/v1/experiments/{exp['id']}/progress").status_code == 401
    assert client.get(f"/v1/experiments/{exp['id']}/progress",
                      headers={"Authorization": "Bearer secret-token"}).status_code == 200
    doc = client.get("/openapi.json").json()
    get = doc["paths"]["/v1/experiments/{experiment_id}/progress"]["get"]
    assert get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ExperimentProgress")
    assert {"401", "404"} <= set(get["responses"])
    assert {"step", "max_steps", "steps_per_s", "eta_s", "loss", "eval_metric", "trials"} <= set(
        doc["components"]["schemas"]["Progress"]["properties"])


# ---- the CLI's words --------------------------------------------------------------------------


def test_the_cli_says_steps_rate_loss_eval_and_eta() -> None:
    from service.watch import progress_text as _progress_text

    running = {"run_id": "a" * 32, "status": "running", "reason": None, "progress": {
        "step": 120, "max_steps": 200, "steps_per_s": 8.31, "eta_s": 9.6, "loss": 0.41234,
        "eval_metric": "eval/accuracy", "eval_value": 0.91, "trials": None}}
    assert _progress_text(running) == ("120/200 steps  8.31 steps/s  loss 0.4123  eval/accuracy 0.91  ETA 10s")
    sweep = {"run_id": "b" * 32, "status": "running", "reason": None, "progress": {
        "step": 700, "max_steps": 1200, "steps_per_s": 5.0, "eta_s": 100.0, "loss": None,
        "eval_metric": "eval/loss", "eval_value": 0.3, "trials": {"total": 6, "finished": 2, "failed": 1,
                                                                  "running": 2}}}
    assert _progress_text(sweep) == ("trials 3/6 (1 failed)  700/1200 steps  5 steps/s  best eval/loss 0.3  "
                                     "ETA 1m40s")
    down = {"run_id": "c" * 32, "status": "running", "progress": None, "reason": "MLflow does not answer"}
    assert _progress_text(down) == "progress unknown: MLflow does not answer"
