"""Rank 0's MLflow logging: params once, metrics in batches, artifacts at the end.

Metrics go straight to MLflow (not through ``ray.train.report``, which is a cluster-wide round
trip per call) and are flushed every ``flush_every`` steps in one ``log_batch`` request.
"""

import json
import time
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

MAX_PARAMS_PER_BATCH = 100


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif value is not None:
        out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class RunLogger:
    def __init__(self, tracking_uri: str, run_id: str, *, enabled: bool = True) -> None:
        self.enabled = enabled and bool(run_id)
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri) if self.enabled else None
        self._pending: list[Metric] = []

    def log_spec(self, resolved: dict[str, Any]) -> None:
        if not self.client:
            return
        params = [Param(k, v[:6000]) for k, v in flatten("", resolved, {}).items()]
        existing = set(self.client.get_run(self.run_id).data.params)
        params = [p for p in params if p.key not in existing]  # a restarted worker logs again
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        self.client.log_dict(self.run_id, resolved, "spec.json")

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.client:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items()]

    def flush(self) -> None:
        if not self.client or not self._pending:
            return
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
        self._pending = []

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.client:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.client:
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.client:
            self.flush()
            self.client.set_terminated(self.run_id, status=status)
