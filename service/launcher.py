"""The Ray Jobs client: submit a run as a job whose submission id derives from the run id.

``RayJobLauncher`` is the real one. The control plane takes any ``Launcher`` so a unit test can
drive the scheduler and reconciler without a cluster (integration tests use real Ray).
"""

import logging
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


def submission_id_for(run_id: str, attempt: int = 1) -> str:
    """The Ray job of a run's attempt: one id per attempt, so a control plane that restarts never
    submits an attempt twice (Ray refuses a second job of the same id)."""
    return f"orchestra-{run_id}" if attempt == 1 else f"orchestra-{run_id}-{attempt}"


@dataclass(frozen=True)
class JobState:
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str = ""


class Launcher(Protocol):
    def submit(self, *, submission_id: str, entrypoint: str, env: dict[str, str],
               num_cpus: float = 0, num_gpus: float = 0, working_dir: str | None = None,
               pip: list[str] | None = None) -> bool: ...
    def status(self, submission_id: str) -> JobState | None: ...
    def stop(self, submission_id: str) -> None: ...
    def logs(self, submission_id: str) -> str: ...
    def ping(self) -> None: ...
    def dashboard_url(self) -> str: ...
    def nodes(self) -> list[dict[str, float]]: ...


def worker_entrypoint(run_id: str, python: str = "") -> str:
    return f"{shlex.quote(python or sys.executable)} -m workers.entrypoint {shlex.quote(run_id)}"


def command_entrypoint(command: str, python: str = "") -> str:
    """A user's command as the job's shell line, with the cluster's interpreter first on PATH (so
    that ``python`` is the one with the cluster's packages, as for a training job)."""
    bindir = os.path.dirname(python or sys.executable)
    return f'export PATH={shlex.quote(bindir)}:"$PATH"; {command}'


def job_env(*, run_id: str, experiment_id: str, mlflow_uri: str, mlflow_run_id: str,
            storage_path: str, mlflow_outage_limit_s: float = 900.0, attempt: int = 1) -> dict[str, str]:
    """The job's environment: where to find things, never the spec itself (the job reads the
    resolved spec from its MLflow run, ``Tracker.put_spec``): an environment string is capped at
    128 KiB on Linux, and Ray shows a job's environment in its dashboard and logs."""
    return {
        "ORCHESTRA_RUN_ID": run_id,
        "ORCHESTRA_ATTEMPT": str(attempt),
        "ORCHESTRA_EXPERIMENT_ID": experiment_id,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "ORCHESTRA_MLFLOW_RUN_ID": mlflow_run_id,
        "ORCHESTRA_STORAGE_PATH": storage_path,
        "PYTHONUNBUFFERED": "1",
        # MLflow's client would retry a down server for minutes inside each call; the workers wait
        # out an outage themselves (workers.mlflow_log), for at most this long
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        "ORCHESTRA_MLFLOW_OUTAGE_LIMIT_S": f"{mlflow_outage_limit_s:g}",
        "MLFLOW_DISABLE_TELEMETRY": "true",  # no reports to MLflow's usage server, from any process
        # Ray Train's controller looks at its workers this often (default 2 s): it is how soon a
        # finished, failed or checkpointing worker is seen, a second off every run's end
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }


class RayJobLauncher:
    """Ray Jobs API over HTTP. Ray's token auth (RAY_AUTH_MODE=token) is honoured by Ray's own
    client, which reads RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH from this process's environment."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        # Ray's client modules load here, in the thread that builds the app: a first import of Ray
        # from two threads at once (the control loop and a readiness check) can leave a half
        # initialised module behind ("partially initialized module 'ray'"), for good.
        import ray.job_submission  # noqa: F401
        import ray.util.state  # noqa: F401

    def _c(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._c(), name)(*args, **kwargs)
        except ConnectionError:
            self._client = None
            raise

    def submit(self, *, submission_id: str, entrypoint: str, env: dict[str, str],
               num_cpus: float = 0, num_gpus: float = 0, working_dir: str | None = None,
               pip: list[str] | None = None) -> bool:
        """Submit; returns False when a job with this id already exists (a retried dispatch).
        ``working_dir`` (a code bundle's zip) is uploaded by Ray's client and unpacked as the job's
        working directory, on the driver and on every worker; ``pip`` installs requirements into
        the job's runtime environment (the cluster needs a reachable package index)."""
        runtime_env: dict[str, Any] = {"env_vars": env}
        if working_dir is not None:
            runtime_env["working_dir"] = working_dir
        if pip:
            runtime_env["pip"] = list(pip)
        try:
            self._call("submit_job", entrypoint=entrypoint, submission_id=submission_id,
                       runtime_env=runtime_env, entrypoint_num_cpus=num_cpus,
                       entrypoint_num_gpus=num_gpus, metadata={"orchestra": "1"})
            return True
        except RuntimeError as exc:
            if "already exists" in str(exc):
                log.info("job %s already submitted", submission_id)
                return False
            raise

    def status(self, submission_id: str) -> JobState | None:
        try:
            info = self._call("get_job_info", submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise
        return JobState(status=str(info.status.value), message=info.message or "")

    def stop(self, submission_id: str) -> None:
        try:
            self._call("stop_job", submission_id)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise

    def logs(self, submission_id: str) -> str:
        try:
            return str(self._call("get_job_logs", submission_id))
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return ""
            raise

    def ping(self) -> None:
        self._call("list_jobs")

    def nodes(self) -> list[dict[str, float]]:
        """Each alive node's resources (Ray's totals), from the dashboard's state API."""
        from ray.util.state import list_nodes

        alive = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], limit=10_000, timeout=10)
        return [{k: float(v) for k, v in (node.resources_total or {}).items()} for node in alive]

    def dashboard_url(self) -> str:
        return self.address
