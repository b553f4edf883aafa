"""MLflow behind its basic-auth app (`orchestra up --mlflow-auth`): anonymous requests are refused,
the control plane and the workers get through with the stack's credentials (MLflow's own client
variables, which the stack gives the API and the Ray head, never a job's runtime environment), and
a wrong password fails at once instead of being waited out as an outage."""

import time
from pathlib import Path

import httpx
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.stack import Stack, free_port
from service.tracking import Tracker
from workers.mlflow_log import RunLogger

pytestmark = [pytest.mark.integration]


def test_mlflow_behind_basic_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack(home=tmp_path, mlflow_port=free_port(25100), mlflow_auth=True)
    stack.start_mlflow()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{stack.mlflow_uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert stack.procs[0].poll() is None, (tmp_path / "logs" / "mlflow.log").read_text()[-3000:]
            time.sleep(0.3)
        anonymous = httpx.get(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1})
        assert anonymous.status_code == 401

        credentials = stack.mlflow_credentials()
        assert set(credentials) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert (tmp_path / "mlflow_admin_password").stat().st_mode & 0o777 == 0o600
        assert credentials.items() <= stack.env().items()  # what the API and the Ray head are given
        for key, value in credentials.items():
            monkeypatch.setenv(key, value)
        tracker = Tracker(stack.mlflow_uri)
        tracker.ping()
        mlflow_run_id = tracker.ensure_run(run_id="r" * 32, experiment_id="e" * 32, spec={"name": "auth"})
        tracker.put_spec(mlflow_run_id, {"name": "auth"})
        logger = RunLogger(stack.mlflow_uri, mlflow_run_id)
        logger.metrics({"train/loss": 0.5}, step=10)
        logger.finish("FINISHED")
        run = MlflowClient(stack.mlflow_uri).get_run(mlflow_run_id)
        assert run.data.metrics["train/loss"] == 0.5 and run.info.status == "FINISHED"

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        t0 = time.monotonic()
        with pytest.raises(MlflowException):
            RunLogger(stack.mlflow_uri, mlflow_run_id).log_spec({"name": "auth"})
        assert time.monotonic() - t0 < 10
    finally:
        stack.stop()
