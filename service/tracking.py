"""The control plane's side of MLflow: create a run's MLflow run before dispatch (so its id is
known at once and survives restarts), and close it if the job dies without doing so."""

from typing import Any

import httpx
from mlflow.tracking import MlflowClient

from service.spec import SPEC_ARTIFACT, SUBMITTED_ARTIFACT

RUN_TAG = "orchestra.run_id"
BUNDLE_TAG = "orchestra.code_bundle"
PING_TIMEOUT_S = 0.8


class Tracker:
    def __init__(self, tracking_uri: str, prefix: str = "orchestra") -> None:
        self.uri = tracking_uri
        self.prefix = prefix
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self, name: str) -> str:
        full = f"{self.prefix}/{name}"
        exp = self.client.get_experiment_by_name(full)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(full))
        except Exception:  # created concurrently
            exp = self.client.get_experiment_by_name(full)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def ensure_run(self, *, run_id: str, experiment_id: str, spec: dict[str, Any]) -> str:
        """The MLflow run of this Orchestra run, created once (found by tag after a crash), in the
        MLflow experiment of the spec's project."""
        mlflow_exp = self._experiment_id(spec.get("project", "default"))
        found = self.client.search_runs([mlflow_exp], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
                                        max_results=1)
        if found:
            return str(found[0].info.run_id)
        tags = {RUN_TAG: run_id, "orchestra.experiment_id": experiment_id,
                "mlflow.runName": f"{spec['name']}-{run_id[:8]}"}
        tags.update({f"user.{k}": v for k, v in spec.get("tags", {}).items()})
        bundle = (spec.get("code") or {}).get("bundle")
        if bundle:
            tags[BUNDLE_TAG] = bundle  # which code the run ran
        return str(self.client.create_run(mlflow_exp, tags=tags).info.run_id)

    def put_spec(self, mlflow_run_id: str, resolved: dict[str, Any], submitted: dict[str, Any] | None = None) -> None:
        """Store the resolved spec on the MLflow run: the job reads it from there. A sweep's trials
        start from the spec as submitted (a trial that changes ``train.max_steps`` gets its own
        default evaluation period, not the resolved one of the base)."""
        self.client.log_dict(mlflow_run_id, resolved, SPEC_ARTIFACT)
        if submitted is not None:
            self.client.log_dict(mlflow_run_id, submitted, SUBMITTED_ARTIFACT)

    def close_if_open(self, mlflow_run_id: str, status: str) -> None:
        run = self.client.get_run(mlflow_run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(mlflow_run_id, status=status)

    def reopen(self, mlflow_run_id: str) -> None:
        """Mark the run running again (a retried attempt goes on logging to it)."""
        self.client.update_run(mlflow_run_id, status="RUNNING")

    def delete_runs(self, mlflow_run_id: str) -> None:
        """Mark the run deleted in MLflow (recoverable there until its garbage collection), with
        its child runs (a sweep's trials)."""
        run = self.client.get_run(mlflow_run_id)
        children = self.client.search_runs([run.info.experiment_id], max_results=50_000,
                                           filter_string=f"tags.mlflow.parentRunId = '{mlflow_run_id}'")
        for child in children:
            self.client.delete_run(child.info.run_id)
        if run.info.lifecycle_stage != "deleted":
            self.client.delete_run(mlflow_run_id)

    def ping(self) -> None:
        """Raise unless the tracking server answers, within a second (MLflow's client retries a
        down server for minutes, which would stall the scheduler and ``/readyz``)."""
        if self.uri.startswith(("http://", "https://")):
            httpx.get(f"{self.uri.rstrip('/')}/health", timeout=PING_TIMEOUT_S).raise_for_status()
        else:
            self.client.search_experiments(max_results=1)
