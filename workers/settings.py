"""The worker's settings, read once from the environment the Ray job (or Ray Train) gives it."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSettings:
    mlflow_uri: str = ""  # MLFLOW_TRACKING_URI
    mlflow_run_id: str = ""  # ORCHESTRA_MLFLOW_RUN_ID: the run's MLflow run, created by the control plane
    storage_path: str = "~/.orchestra/ray_results"  # ORCHESTRA_STORAGE_PATH: Ray Train's checkpoints
    ray_address: str = "auto"  # RAY_ADDRESS: the cluster a sweep's driver joins
    # ORCHESTRA_KILL_GRACE_S: seconds faults.kill (and faults.fail_job) wait before the crash. Ray
    # Train's controller collects reported checkpoints when it polls the workers (every 0.5 s in
    # Orchestra's jobs, service.launcher.job_env); four polls make the fault "a crash after the last
    # checkpoint".
    kill_grace_s: float = 2.0
    # ORCHESTRA_MLFLOW_OUTAGE_LIMIT_S: how long rank 0 trains on while MLflow does not answer
    # (metrics held, spilled to disk) before the run fails with the reason
    mlflow_outage_limit_s: float = 900.0
    # ORCHESTRA_RAY_LOST_EXIT_S: the job's driver exits once the Ray head's GCS port has refused it
    # for this long (the head is gone; workers.watchdog)
    ray_lost_exit_s: float = 30.0
    attempt: int = 1  # ORCHESTRA_ATTEMPT: which attempt of the run this job is (a retry: 2, 3, ...)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        return cls(
            mlflow_uri=env.get("MLFLOW_TRACKING_URI", cls.mlflow_uri),
            mlflow_run_id=env.get("ORCHESTRA_MLFLOW_RUN_ID", cls.mlflow_run_id),
            storage_path=os.path.expanduser(env.get("ORCHESTRA_STORAGE_PATH") or cls.storage_path),
            ray_address=env.get("RAY_ADDRESS") or cls.ray_address,
            kill_grace_s=float(env.get("ORCHESTRA_KILL_GRACE_S") or cls.kill_grace_s),
            mlflow_outage_limit_s=float(env.get("ORCHESTRA_MLFLOW_OUTAGE_LIMIT_S") or cls.mlflow_outage_limit_s),
            ray_lost_exit_s=float(env.get("ORCHESTRA_RAY_LOST_EXIT_S") or cls.ray_lost_exit_s),
            attempt=int(env.get("ORCHESTRA_ATTEMPT") or cls.attempt),
        )


@functools.cache
def settings() -> WorkerSettings:
    """This process's settings (read on first use)."""
    return WorkerSettings.from_env()


def setup_logging() -> None:
    """INFO and above of ``workers.*`` to stderr, for a process Orchestra starts (the Ray job's driver,
    a Ray Train worker, a parameter-server actor); a no-op where a handler is already set up."""
    log = logging.getLogger("workers")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[orchestra] %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
