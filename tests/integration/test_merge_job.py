"""Merge runs: the worker against a real MLflow (no Ray), then a merge through the whole stack."""

import json
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from tests.conftest import small_spec, wait_for

pytestmark = [pytest.mark.integration]


def _merge_spec(name: str, merge: dict) -> dict:  # type: ignore[type-arg]
    return {"name": name, "task": {"kind": "merge", "dataset": {"name": "digits"}}, "merge": merge}


# ---- the worker alone, on an MLflow SQLite store ----------------------------------------------------


def _train_and_log(client: MlflowClient, uri: str, exp: str, classes: list[int], seed: int) -> str:
    from service.spec import ExperimentSpec
    from workers.mlflow_log import RunLogger
    from workers.model_io import save_final_model
    from workers.tasks import build_task

    spec = ExperimentSpec.model_validate(small_spec(f"half-{seed}") | {"distributed": {"num_workers": 1}})
    spec.task.dataset.classes = classes  # type: ignore[union-attr]
    torch.manual_seed(seed)
    task = build_task(spec)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = task.x_tr, task.y_tr  # type: ignore[attr-defined]
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    run = client.create_run(exp, tags={"orchestra.run_id": f"orch-{seed}"})
    logger = RunLogger(uri, run.info.run_id)
    save_final_model(logger, spec, model)
    logger.finish()
    return str(run.info.run_id)


def test_worker_resolves_every_kind_of_input_and_logs_the_merge(tmp_path: Path) -> None:
    from service.spec import ExperimentSpec
    from workers.merge_job import load_model, run_merge
    from workers.tasks import build_task

    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("merge-worker", artifact_location=str(tmp_path / "artifacts"))
    r1 = _train_and_log(client, uri, exp, [0, 1, 2, 3, 4], 1)
    _train_and_log(client, uri, exp, [5, 6, 7, 8, 9], 2)
    local = client.download_artifacts(r1, "model", str(tmp_path / "local"))

    # an Orchestra run id, an MLflow runs:/ URI and a local folder; PLeaS at 1.5x width
    merge = {"method": "pleas", "inputs": [local, "orch-2"], "target_width": 1.5, "data": {"batches": 8}}
    run = client.create_run(exp)
    metrics = run_merge(ExperimentSpec.model_validate(_merge_spec("m", merge)), run_id="m1", mlflow_uri=uri,
                        mlflow_run_id=run.info.run_id)
    logged = client.get_run(run.info.run_id).data
    for key in ("eval/accuracy", "inputs/0/eval/accuracy", "inputs/1/eval/accuracy", "ensemble/eval/accuracy"):
        assert logged.metrics[key] == pytest.approx(metrics[key])
    assert logged.tags["orchestra.merge.method"] == "pleas"
    # each input saw half of the classes; the merged model must know both halves
    assert metrics["eval/accuracy"] > max(metrics["inputs/0/eval/accuracy"], metrics["inputs/1/eval/accuracy"])
    # the logged model rebuilds (at its merged width) and scores what was logged
    folder = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "merged"))
    merged, spec = load_model(folder)
    assert spec.task.model.hidden == [96]  # type: ignore[union-attr]
    evaluated = build_task(spec).evaluate(merged, torch.device("cpu"), 8)
    assert evaluated["eval/accuracy"] == pytest.approx(metrics["eval/accuracy"])

    # a merged model is itself an input (runs:/ URI), and an unknown id is a clear error
    again = _merge_spec("m2", {"method": "average", "inputs": [f"runs:/{run.info.run_id}/model", f"runs:/{r1}/model"]})
    with pytest.raises(ValueError, match="shape"):  # 96 vs 64 hidden units: average refuses
        run_merge(ExperimentSpec.model_validate(again), run_id="m2", mlflow_uri=uri, mlflow_run_id="")
    bad = _merge_spec("m3", {"method": "average", "inputs": ["orch-1", "no-such-run"]})
    with pytest.raises(ValueError, match="no-such-run"):
        run_merge(ExperimentSpec.model_validate(bad), run_id="m3", mlflow_uri=uri, mlflow_run_id="")


# ---- through the API, on Ray ------------------------------------------------------------------------


@pytest.mark.slow
def test_merge_of_two_finished_runs_through_the_api(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    ids = []
    for half, classes in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
        spec = small_spec(f"it-merge-half{half}", max_steps=40, eval_every=40, seed=half)
        spec["task"]["dataset"]["classes"] = classes
        spec["distributed"]["num_workers"] = 1
        ids.append(client.post("/v1/experiments", json=spec).json()["id"])
    runs = []
    for exp_id in ids:
        exp = wait_for(client, exp_id, {"succeeded", "failed", "cancelled"})
        assert exp["status"] == "succeeded", exp["runs"][0]["error"]
        runs.append(exp["runs"][0]["id"])

    merge = {"method": "pleas", "inputs": runs, "data": {"batches": 4}}
    resp = client.post("/v1/experiments", json=_merge_spec("it-merge", merge))
    assert resp.status_code in (200, 201), resp.text
    exp = wait_for(client, resp.json()["id"], {"succeeded", "failed", "cancelled"})
    run = exp["runs"][0]
    assert exp["status"] == "succeeded", run["error"]
    mlflow = MlflowClient(stack.mlflow_uri)
    data = mlflow.get_run(run["mlflow_run_id"]).data
    for key in ("eval/accuracy", "eval/loss", "inputs/0/eval/accuracy", "inputs/1/eval/accuracy",
                "ensemble/eval/accuracy", "merge/seconds"):
        assert key in data.metrics, sorted(data.metrics)
    assert json.loads(data.tags["orchestra.merge.inputs"]) == runs
    assert {a.path for a in mlflow.list_artifacts(run["mlflow_run_id"], "model")} >= {"model/state_dict.pt",
                                                                                       "model/spec.json"}
