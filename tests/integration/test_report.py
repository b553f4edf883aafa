"""Comparison reports against a real MLflow server: a sweep's trials read as child runs (another
sweep in the same MLflow experiment left out), the values in the page equal to what was logged,
the page kept as the run's artifact; then GET /v1/experiments/{id}/report (viewers read it, its
refusals name the parameter, 503 while MLflow is away) and `orchestra report`."""

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from service.report.publish import ARTIFACT, publish_report, report_html
from service.stack import free_port
from service.tracking import Tracker
from tests.api_harness import make_client
from tests.faults.mlflow_server import PrivateMlflow
from tests.unit.test_api import QUICKSTART
from tests.unit.test_users import as_, users_file

pytestmark = [pytest.mark.integration]
AGGREGATORS: list[dict[str, Any]] = [{"name": "mean"}, {"name": "flag", "f": 2}, {"name": "flag", "f": 3}]
SEEDS = 3


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMlflow]:
    server = PrivateMlflow(folder=tmp_path_factory.mktemp("mlflow"), port=free_port(35700))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def loss_at(a: int, seed: int, step: int) -> float:
    return 2.0 / (1 + step * (a + 1) / 20) + 0.01 * seed


def log_sweep(client: MlflowClient, exp: str, name: str) -> str:
    """A sweep's parent run and its children: the aggregator block x 3 seeds, as workers/sweep.py
    and the trials' RunLogger log them (flattened spec params, ``sweep.<path>`` params)."""
    parent = client.create_run(exp, run_name=name).info.run_id
    for a, agg in enumerate(AGGREGATORS):
        for seed in range(SEEDS):
            child = client.create_run(exp, run_name=f"{name}-{a}-{seed}", tags={"mlflow.parentRunId": parent,
                                                                               "orchestra.run_id": "r" * 32})
            params = {"name": name, "train.seed": str(seed), "optimizer.name": "sgd", "optimizer.lr": "0.2",
                      **{f"distributed.aggregator.{k}": str(v) for k, v in agg.items()},
                      "sweep.distributed.aggregator": str(agg), "sweep.train.seed": str(seed)}
            metrics = [Metric("train/loss", loss_at(a, seed, s), 1000 + s, s) for s in range(0, 100, 10)]
            metrics += [Metric("eval/accuracy", 0.5 + 0.1 * a + 0.01 * seed, 2000, 100)]
            client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
            client.set_terminated(child.info.run_id)
    return str(parent)


@pytest.fixture(scope="module")
def runs(mlflow: PrivateMlflow) -> dict[str, str]:
    client = MlflowClient(tracking_uri=mlflow.uri)
    exp = client.create_experiment("orchestra/report-test")
    plain = client.create_run(exp, run_name="plain").info.run_id
    client.log_batch(plain, params=[Param("optimizer.name", "adamw"), Param("train.seed", "0")],
                     metrics=[Metric("train/loss", 1.5, 0, 0), Metric("train/loss", 0.9, 1, 50)])
    return {"sweep": log_sweep(client, exp, "robust"), "other": log_sweep(client, exp, "unrelated"), "plain": plain}


def test_a_sweep_report_from_mlflow(mlflow: PrivateMlflow, runs: dict[str, str], tmp_path: Path) -> None:
    page = report_html(mlflow.uri, [runs["sweep"]], title="robust")
    assert "9 trials of 1 MLflow run(s)" in page  # the other sweep of the experiment is not mixed in
    table = page[page.index("<h2>train/loss</h2>"):page.index("<h2>eval/accuracy</h2>")]
    finals = [loss_at(2, s, 90) for s in range(SEEDS)]  # flag f=3 (a = 2): the second row
    mean = sum(finals) / SEEDS
    std = math.sqrt(sum((x - mean) ** 2 for x in finals) / (SEEDS - 1))
    assert f"<td>flag f=3</td><td class='num'>3</td><td class='num'>{mean:.4g} \u00b1 {std:.4g}</td>" in table
    assert re.findall(r"<tr><td>([^<]+)</td><td class='num'>3</td>", table) == ["flag f=2", "flag f=3", "mean"]
    logged = MlflowClient(tracking_uri=mlflow.uri).download_artifacts(runs["sweep"], ARTIFACT, str(tmp_path))
    assert Path(logged).read_text(encoding="utf-8") == page  # kept on the sweep's run


def test_publish_for_the_reproduce_command(mlflow: PrivateMlflow, runs: dict[str, str], tmp_path: Path) -> None:
    experiments = [{"name": "robust", "runs": [{"mlflow_run_id": runs["sweep"]}]},
                   {"name": "plain", "runs": [{"mlflow_run_id": runs["plain"]}]}]
    out = publish_report(mlflow.uri, experiments, metrics=["train/loss"], group_by=["optimizer.name"],
                         title="Claims", sections=[("Claims and verdicts", "<p id='verdicts'>holds</p>")],
                         out=tmp_path / "r" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert "<p id='verdicts'>holds</p>" in page and "10 trials of 2 MLflow run(s)" in page
    assert re.findall(r"<tr><td>([^<]+)</td><td class='num'>(\d+)</td><td class='num'>", page) == [
        ("adamw", "1"), ("sgd", "9")]


# ---- the API and the CLI ----------------------------------------------------------------------


@pytest.fixture()
def api(mlflow: PrivateMlflow, runs: dict[str, str], tmp_path: Path) -> tuple[TestClient, dict[str, Any]]:
    """The API on SQLite with users, MLflow the real server; two experiments whose runs are the
    sweep and the plain run (set in the database as the scheduler would)."""
    from service.db import engine_for, session_factory
    from service.models import RunRow

    url = f"sqlite:///{tmp_path / 'api.db'}"
    client = make_client(url, users_file=users_file(tmp_path), tracker=Tracker(mlflow.uri))
    ids: dict[str, Any] = {}
    for key in ("sweep", "plain", "queued"):
        spec = {**yaml.safe_load(QUICKSTART), "name": f"report-{key}"}
        r = client.post("/v1/experiments", json=spec, headers=as_("alice"))
        assert r.status_code == 201, r.text
        ids[key] = r.json()["id"]
    with session_factory(engine_for(url))() as session:
        for key in ("sweep", "plain"):
            row = session.query(RunRow).filter_by(experiment_id=ids[key]).one()
            row.mlflow_run_id = runs[key]
        session.commit()
    return client, ids


def test_the_route(api: tuple[TestClient, dict[str, Any]], runs: dict[str, str]) -> None:
    client, ids = api
    url = f"/v1/experiments/{ids['sweep']}/report"
    assert client.get(url).status_code == 401
    r = client.get(url, headers=as_("guest"))  # viewers read reports
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "img-src data:" in r.headers["content-security-policy"]
    assert "<title>Report: report-sweep</title>" in r.text and "<h2>eval/accuracy</h2>" in r.text

    both = client.get(url, headers=as_("guest"), params={"metric": "train/loss", "group_by": "optimizer.name",
                                                         "also": ids["plain"], "band": "minmax"})
    assert both.status_code == 200, both.text
    assert "10 trials of 2 MLflow run(s)" in both.text and "<h2>eval/accuracy</h2>" not in both.text
    assert "lowest to the highest" in both.text

    refused = (({"metric": "eval/f1"}, "metric", 422), ({"group_by": "optimizer.nme"}, "group_by", 422),
               ({"also": "0" * 32}, "also", 404), ({"band": "iqr"}, "query.band", 422))
    for params, field, status in refused:
        r = client.get(url, headers=as_("guest"), params=params)
        assert r.status_code == status and r.json()["detail"][0]["field"] == field, r.text
    queued = client.get(f"/v1/experiments/{ids['queued']}/report", headers=as_("guest"))
    assert queued.status_code == 409, queued.text


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")  # the client's, on a TestClient
def test_the_cli(api: tuple[TestClient, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`orchestra report` through the Python client, its HTTP client the in-process API's."""
    import service.cli as cli
    from service.client import Client

    client, ids = api
    client.headers.update(as_("guest"))

    def in_process(_: str | None) -> Client:
        c = Client.__new__(Client)
        c.url, c.http = "http://testserver", client  # type: ignore[assignment]  # the same calls as httpx.Client
        return c

    monkeypatch.setattr(cli, "_client", in_process)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(cli.app, ["report", ids["sweep"], ids["plain"], "--metric", "train/loss",
                                        "--group-by", "optimizer"])
    assert done.exit_code == 0, done.output
    path = tmp_path / f"report-{ids['sweep']}.html"
    assert done.output.strip() == path.name and "10 trials of 2 MLflow run(s)" in path.read_text(encoding="utf-8")
    bad = CliRunner().invoke(cli.app, ["report", ids["sweep"], "--metric", "eval/f1"])
    assert bad.exit_code == 2 and "metric" in bad.output


def test_mlflow_away_is_503_with_retry_after(api: tuple[TestClient, dict[str, Any]], mlflow: PrivateMlflow) -> None:
    """Last in the module: it stops the server."""
    client, ids = api
    mlflow.stop()
    try:
        r = client.get(f"/v1/experiments/{ids['sweep']}/report", headers=as_("guest"))
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["detail"][0]["field"] == "mlflow"
    finally:
        mlflow.start()
