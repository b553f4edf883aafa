"""A parameter-server run through the real path: a Ray job (`python -m workers.entrypoint`) on the
local Ray head, Ray actors as workers, MLflow for the metrics. One straggler (fixed 1 s delay)
against cyclic repetition with s = 1: the server must not wait for it."""

import statistics
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from service.launcher import RayJobLauncher, job_env, submission_id_for, worker_entrypoint
from service.spec import ExperimentSpec
from service.tracking import Tracker

pytestmark = [pytest.mark.integration]

STEPS, DELAY_S = 8, 1.0


def test_coded_parameter_server_outwaits_a_straggler(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = ExperimentSpec.model_validate({
        "name": "it-ps-coding",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [32]}},
        "train": {"max_steps": STEPS, "batch_size": 48, "eval_every": 4, "log_every": 2, "seed": 0},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "distributed": {"num_workers": 3, "strategy": "parameter_server",
                        "gradient_coding": {"scheme": "cyclic_repetition", "stragglers": 1}},
        "faults": {"stragglers": {"ranks": [2], "delay": {"dist": "fixed", "mean_ms": DELAY_S * 1000}}},
    })
    mlflow = MlflowClient(stack.mlflow_uri)
    run = mlflow.create_run(mlflow.create_experiment(f"it-ps-{uuid.uuid4().hex[:8]}"))
    run_id = f"ps{uuid.uuid4().hex[:8]}"
    launcher = RayJobLauncher(stack.ray_address)
    Tracker(stack.mlflow_uri).put_spec(run.info.run_id, spec.resolved())
    env = job_env(run_id=run_id, experiment_id="it", mlflow_uri=stack.mlflow_uri,
                  mlflow_run_id=run.info.run_id, storage_path=str(tmp_path))
    sub = submission_id_for(run_id)
    launcher.submit(submission_id=sub, entrypoint=worker_entrypoint(run_id), env=env)
    deadline = time.monotonic() + 240
    state = launcher.status(sub)
    while time.monotonic() < deadline and (state is None or state.status not in ("SUCCEEDED", "FAILED", "STOPPED")):
        time.sleep(1)
        state = launcher.status(sub)
    assert state is not None and state.status == "SUCCEEDED", launcher.logs(sub)[-3000:]

    mid = run.info.run_id
    assert mlflow.get_run(mid).info.status == "FINISHED"
    late = mlflow.get_metric_history(mid, "ps/late/w2")
    assert sorted(m.step for m in late) == list(range(1, STEPS + 1))  # the straggler, every step
    assert not mlflow.get_metric_history(mid, "ps/late/w0")
    waits = [m.value for m in mlflow.get_metric_history(mid, "ps/wait_s")]
    assert len(waits) == STEPS and statistics.median(waits) < DELAY_S / 2, waits
    for key in ("ps/decode_s", "perf/step_time_s", "train/loss", "train/lr"):
        assert len(mlflow.get_metric_history(mid, key)) == STEPS, key
    assert "eval/accuracy" in mlflow.get_run(mid).data.metrics
    paths = {a.path for a in mlflow.list_artifacts(mid, "model")} | {
        a.path for a in mlflow.list_artifacts(mid, "parameter_server")}
    assert {"model/state_dict.pt", "parameter_server/steps.jsonl"} <= paths
