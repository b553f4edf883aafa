"""Your own code on the cluster, through `orchestra serve` on PostgreSQL, a real Ray and MLflow:
a custom task shipped as a bundle (the API killed between upload and dispatch), a sweep over its
params, a command job that logs to MLflow, and one that fails with its own last lines."""

import shutil
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.client import Client
from service.stack import free_port
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom"


def custom(name: str, **changes: object) -> dict:  # type: ignore[type-arg]
    doc = {"name": name, "task": {"kind": "custom", "entrypoint": "mylab.task:build",
                                  "params": {"width": 32, "n_train": 1024}},
           "train": {"max_steps": 60, "batch_size": 32, "log_every": 10, "eval_every": 30},
           "optimizer": {"name": "galore", "lr": 0.01, "rank": 4, "update_proj_gap": 20},
           "distributed": {"num_workers": 2, "aggregator": {"name": "median", "f": 0}}}
    doc.update(changes)
    return doc


def test_custom_task_survives_an_api_kill_between_upload_and_dispatch(api, stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = Client(api.url)
    api.kill9()  # restart with Ray out of reach: the run is stored and waits in the queue
    ray_address = api.env["ORCHESTRA_RAY_ADDRESS"]
    api.env["ORCHESTRA_RAY_ADDRESS"] = f"http://127.0.0.1:{free_port(29996)}"
    api.ready_path = "/healthz"
    api.start()
    code = tmp_path / "code"
    shutil.copytree(EXAMPLE, code)
    (code / ".gitignore").write_text("scratch/\n")
    (code / "scratch").mkdir()
    (code / "scratch" / "big.bin").write_bytes(b"\0" * 1000)
    exp = client.submit(custom("it-custom"), code=code)
    digest = exp["spec"]["code"]["bundle"]
    assert exp["status"] == "queued"
    api.kill9()
    api.env["ORCHESTRA_RAY_ADDRESS"] = ray_address
    api.ready_path = "/readyz"
    api.start()
    done = client.wait(exp["id"], timeout=300)
    run = done["runs"][0]
    assert done["status"] == "succeeded", run["error"]
    mlflow = MlflowClient(stack.mlflow_uri)
    assert mlflow.get_run(run["mlflow_run_id"]).data.tags["orchestra.code_bundle"] == digest
    losses = [v for _, v in client.metric_history(run["id"], "train/loss")]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert "eval/mae" in mlflow.get_run(run["mlflow_run_id"]).data.metrics
    bundle = httpx.get(f"{api.url}/v1/bundles/{digest}").json()
    assert bundle["files"] == 6  # mylab/__init__.py, mylab/task.py, train.py, two specs, .gitignore: not scratch/


def test_sweep_over_a_custom_tasks_params(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = Client(api.url)
    spec = custom("it-custom-sweep", distributed={"num_workers": 1},
                  optimizer={"name": "adamw", "lr": 0.01},
                  train={"max_steps": 20, "batch_size": 32, "log_every": 10, "eval_every": 10},
                  sweep={"parameters": {"task.params.width": {"grid": [8, 32]}}, "metric": "eval/loss",
                         "max_concurrent_trials": 1})
    done = client.wait(client.submit(spec, code=EXAMPLE)["id"], timeout=300)
    run = done["runs"][0]
    assert done["status"] == "succeeded", run["error"]
    mlflow = MlflowClient(stack.mlflow_uri)
    parent = mlflow.get_run(run["mlflow_run_id"])
    children = mlflow.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(c.data.params["sweep.task.params.width"]) for c in children) == [8, 32]
    assert all("eval/mae" in c.data.metrics for c in children)


def test_command_jobs_log_to_mlflow_and_fail_with_their_own_lines(api, stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = Client(api.url)
    sweep = client.submit((EXAMPLE / "command.yaml"), code=EXAMPLE)
    code = tmp_path / "failing"
    code.mkdir()
    (code / "fails.py").write_text("import sys\nprint('loading shard 7 of 9')\nprint('shard 7 is corrupt')\n"
                                   "sys.exit(3)\n")
    failing = client.submit({"name": "it-cmd-fail", "task": {"kind": "command", "command": "python fails.py"}},
                            code=code)
    plain = client.submit({"name": "it-cmd", "task": {"kind": "command", "command": "python train.py --steps 30",
                                                      "params": {}}}, code=EXAMPLE)
    mlflow = MlflowClient(stack.mlflow_uri)

    done = client.wait(plain["id"], timeout=300)
    assert done["status"] == "succeeded", done["runs"][0]["error"]
    info = mlflow.get_run(done["runs"][0]["mlflow_run_id"])
    assert info.info.status == "FINISHED" and "eval/loss" in info.data.metrics
    assert [s for s, _ in client.metric_history(done["runs"][0]["id"], "train/loss")] == [10, 20, 30]

    done = client.wait(failing["id"], timeout=300)
    assert done["status"] == "failed"
    assert "shard 7 is corrupt" in done["runs"][0]["error"]

    done = wait_for(httpx.Client(base_url=api.url, timeout=30), sweep["id"], {"succeeded", "failed", "cancelled"})
    run = done["runs"][0]
    assert done["status"] == "succeeded", run["error"]
    parent = mlflow.get_run(run["mlflow_run_id"])
    children = mlflow.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(float(c.data.params["sweep.task.params.lr"]) for c in children) == [0.003, 0.03]
    assert all("eval/loss" in c.data.metrics and "train/loss" in c.data.metrics for c in children)
    assert "sweep/best/eval/loss" in parent.data.metrics
