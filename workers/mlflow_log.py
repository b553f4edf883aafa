"""Rank 0's MLflow logging: params once, metrics in batches, artifacts at the end; training goes
on while the MLflow server is away.

Metrics go straight to MLflow (not through ``ray.train.report``, which is a cluster-wide round
trip per call) and are sent in ``log_batch`` requests when the loop flushes (its evaluation and
checkpoint cadence). A flush that cannot reach the server keeps the metrics and returns at once,
so the workers keep training: up to ``memory_limit`` metrics are held in memory, beyond that they
are spilled to a file on local disk; the next flush sends the spilled ones first, then the rest,
in the order they were logged. Each metric keeps the timestamp it was logged with, and MLflow
stores a metric (key, step, timestamp, value) once however often it is sent, so a batch resent
after a reply was lost is not counted twice. The last flush (``finish``, the final model's
artifacts) and the calls that are not metrics wait for the server, retrying. When the server has
been away longer than ``outage_limit_s`` the run fails with :class:`MlflowUnavailable` instead of
hanging.

MLflow's client retries a failed request for minutes on its own: the job's environment turns
that off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, see ``service.launcher.job_env``), so these waits
are the only ones.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workers.settings import settings

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                       "PERMISSION_DENIED", "UNAUTHENTICATED"})  # errors that waiting does not mend
log = logging.getLogger(__name__)
T = TypeVar("T")


class MlflowUnavailable(RuntimeError):
    """The tracking server did not answer for longer than the run allows."""


def transient(exc: BaseException) -> bool:
    """A failure of the server or the network (worth waiting out), not a request MLflow refuses."""
    if isinstance(exc, MlflowException):
        return exc.error_code not in PERMANENT
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(exc).__module__.startswith(
        ("requests", "urllib3"))


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif value is not None:
        out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class RunLogger:
    def __init__(self, tracking_uri: str, run_id: str, *, enabled: bool = True,
                 outage_limit_s: float | None = None, memory_limit: int = 50_000, retry_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.enabled = enabled and bool(run_id)
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri) if self.enabled else None
        self.outage_limit_s = settings().mlflow_outage_limit_s if outage_limit_s is None else outage_limit_s
        self.memory_limit, self.retry_s = memory_limit, retry_s
        self.clock, self.sleep = clock, sleep
        self._pending: list[Metric] = []
        self._spill: str | None = None  # a JSONL file of metrics older than those in memory
        self._spilled = 0
        self._away_since: float | None = None

    # ---- waiting out an outage ---------------------------------------------------------------

    def _failed(self, exc: BaseException, what: str) -> None:
        """Record a transient failure; raise when it is not one, or when the outage is too long."""
        if not transient(exc):
            raise exc
        now = self.clock()
        if self._away_since is None:
            self._away_since = now
            log.warning("MLflow does not answer (%s: %s); training goes on, metrics are kept until it does",
                        type(exc).__name__, str(exc)[:200])
        if now - self._away_since > self.outage_limit_s:
            raise MlflowUnavailable(f"the MLflow server did not answer for {now - self._away_since:.0f} s "
                                    f"(limit {self.outage_limit_s:.0f} s) while {what}: {exc}") from exc

    def _answered(self) -> None:
        if self._away_since is not None:
            log.info("MLflow answers again after %.0f s", self.clock() - self._away_since)
        self._away_since = None

    def _wait_for(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` once the server answers (retried until the outage limit)."""
        while True:
            try:
                result = call()
            except Exception as exc:
                self._failed(exc, what)
                self.sleep(self.retry_s)
                continue
            self._answered()
            return result

    # ---- params, metrics, artifacts ----------------------------------------------------------

    def log_spec(self, resolved: dict[str, Any]) -> None:
        if not self.client:
            return
        client = self.client
        params = [Param(k, v[:6000]) for k, v in flatten("", resolved, {}).items()]
        existing = set(self._wait_for("reading the run", lambda: client.get_run(self.run_id)).data.params)
        params = [p for p in params if p.key not in existing]  # a restarted worker logs again
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            chunk = params[i:i + MAX_PARAMS_PER_BATCH]
            self._wait_for("logging params", partial(client.log_batch, self.run_id, params=chunk))
        self._wait_for("logging the spec", lambda: client.log_dict(self.run_id, resolved, "spec.json"))

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.client:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self._pending) > self.memory_limit:
            self._spill_pending()

    def flush(self, *, wait: bool = False) -> None:
        """Send what is held (spilled first); without ``wait``, a server that does not answer
        leaves it held and returns at once."""
        if not self.client or (not self._pending and not self._spilled):
            return
        while True:
            try:
                self._send_spilled()
                self._send(self._pending)
                self._pending = []
                self._answered()
                return
            except Exception as exc:
                self._failed(exc, "sending metrics")
                if len(self._pending) > self.memory_limit:
                    self._spill_pending()
                if not wait:
                    return
                self.sleep(self.retry_s)

    def _send(self, metrics: list[Metric]) -> None:
        assert self.client is not None
        while metrics:
            self.client.log_batch(self.run_id, metrics=metrics[:MAX_METRICS_PER_BATCH])
            del metrics[:MAX_METRICS_PER_BATCH]  # what was sent is not sent again

    def _spill_pending(self) -> None:
        if self._spill is None:
            fd, self._spill = tempfile.mkstemp(prefix=f"orchestra-metrics-{self.run_id}-", suffix=".jsonl")
            os.close(fd)
        with open(self._spill, "a") as fh:
            for m in self._pending:
                fh.write(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n")
        self._spilled += len(self._pending)
        log.warning("%d metrics held for MLflow; spilled to %s", self._spilled, self._spill)
        self._pending = []

    def _send_spilled(self) -> None:
        if not self._spilled or self._spill is None:
            return
        with open(self._spill) as fh:
            held = [Metric(*json.loads(line)) for line in fh]
        self._send(held)
        os.remove(self._spill)
        self._spill, self._spilled = None, 0

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.client:
            client = self.client
            for k, v in tags.items():
                self._wait_for("setting tags", partial(client.set_tag, self.run_id, k, v))

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.client:
            client = self.client
            self._wait_for("uploading artifacts",
                           lambda: client.log_artifacts(self.run_id, local_dir, artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.client:
            client = self.client
            self.flush(wait=True)
            self._wait_for("closing the run", lambda: client.set_terminated(self.run_id, status=status))
