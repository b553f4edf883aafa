"""The MLflow server killed for a while (10 s) as a run trains, then started again on the same port and
store: the workers keep training with their metrics held, every logged step of ``train/loss``
is in the run exactly once afterwards, and the run ends ``succeeded``."""

import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.stack import free_port
from tests.conftest import ApiProcess, small_spec, wait_for
from tests.faults.mlflow_server import PrivateMlflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 10.0  # long enough for several flushes to fail; the suite has a time budget


def test_mlflow_outage_mid_run(stack, postgres_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from service.db import upgrade

    mlflow = PrivateMlflow(folder=tmp_path / "mlflow", port=free_port(35500))
    mlflow.start()
    upgrade(postgres_url)
    port = free_port(28400)
    env = {**os.environ, **stack.env(), "ORCHESTRA_DATABASE_URL": postgres_url, "ORCHESTRA_HOME": str(tmp_path),
           "ORCHESTRA_STORAGE_PATH": str(tmp_path / "ray_results"), "ORCHESTRA_MLFLOW_TRACKING_URI": mlflow.uri,
           "ORCHESTRA_RECONCILER_INTERVAL_S": "0.5", "ORCHESTRA_SCHEDULER_INTERVAL_S": "0.5"}
    api = ApiProcess(url=f"http://127.0.0.1:{port}", env=env, port=port)
    api.start()
    try:
        client = httpx.Client(base_url=api.url, timeout=30)
        spec = small_spec("fault-mlflow", max_steps=1500, eval_every=500, log_every=10)
        spec["distributed"]["num_workers"] = 1
        exp = client.post("/v1/experiments", json=spec).json()
        wait_for(client, exp["id"], {"running"})
        run_id = exp["runs"][0]["id"]
        mlflow_run = client.get(f"/v1/runs/{run_id}").json()["mlflow_run_id"]
        deadline = time.monotonic() + 120
        while not MlflowClient(mlflow.uri).get_metric_history(mlflow_run, "train/loss"):  # training has begun
            assert time.monotonic() < deadline
            time.sleep(0.5)

        mlflow.stop()
        time.sleep(OUTAGE_S)
        assert client.get(f"/v1/experiments/{exp['id']}").json()["status"] == "running"
        mlflow.start()

        done = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
        assert done["status"] == "succeeded", done["runs"][0]["error"]
        history = MlflowClient(mlflow.uri).get_metric_history(mlflow_run, "train/loss")
        counts = Counter(m.step for m in history)
        assert sorted(counts) == list(range(10, 1501, 10)) and set(counts.values()) == {1}, counts
        logs = client.get(f"/v1/runs/{run_id}/logs", params={"tail": 100000}).json()["logs"]
        assert "MLflow does not answer" in logs and "MLflow answers again" in logs
    finally:
        api.stop()
        mlflow.stop()
