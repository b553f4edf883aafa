"""The scheduler: queued runs -> Ray jobs, by priority then FIFO, within the concurrency limit.

Dispatch is crash-safe: the MLflow run is created (or found by tag) and stored first, the Ray job
is submitted under an id derived from the run id (a second submit is refused by Ray and treated as
done), and only then is the run marked ``dispatched``. A crash at any point repeats the same steps
without a second job.
"""

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.launcher import Launcher, job_env, submission_id_for, worker_entrypoint
from service.models import RunRow
from service.repo import runs as runs_repo
from service.state import RunStatus, transition
from service.tracking import Tracker

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, sessions: sessionmaker[Session], launcher: Launcher, tracker: Tracker, *,
                 max_concurrent: int, storage_path: str, job_python: str = "") -> None:
        self.sessions = sessions
        self.launcher = launcher
        self.tracker = tracker
        self.max_concurrent = max_concurrent
        self.job_python = job_python
        self.storage_path = storage_path

    def tick(self) -> int:
        """One pass; returns how many runs were dispatched."""
        dispatched = 0
        with self.sessions() as session:
            for row in runs_repo.cancel_requested_queued(session):
                transition(row, RunStatus.CANCELLED, error="cancelled before dispatch")
            session.commit()
            free = self.max_concurrent - runs_repo.count_active(session)
            if free <= 0:
                return 0
            for row in runs_repo.queued_rows(session, free):
                try:
                    self._dispatch(session, row)
                    dispatched += 1
                except Exception as exc:  # a down MLflow or Ray: leave queued, retry next tick
                    session.rollback()
                    log.warning("dispatch of run %s deferred: %s", row.id, exc)
                    break
        return dispatched

    def _dispatch(self, session: Session, row: RunRow) -> None:
        spec: dict[str, Any] = row.experiment.resolved_spec
        if row.mlflow_run_id is None:
            row.mlflow_run_id = self.tracker.ensure_run(run_id=row.id, experiment_id=row.experiment_id,
                                                        spec=spec)
            session.commit()
        sid = submission_id_for(row.id)
        self.launcher.submit(
            submission_id=sid,
            entrypoint=worker_entrypoint(row.id, self.job_python),
            env=job_env(run_id=row.id, experiment_id=row.experiment_id, resolved_spec=spec,
                        mlflow_uri=self.tracker.uri, mlflow_run_id=row.mlflow_run_id, storage_path=self.storage_path),
            num_cpus=0,  # the driver only coordinates; Ray Train's workers claim the resources
        )
        row.ray_submission_id = sid
        transition(row, RunStatus.DISPATCHED)
        session.commit()
        log.info("run %s dispatched as Ray job %s", row.id, sid)
