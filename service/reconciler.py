"""The reconciler: Ray's view -> the database. The only writer of running / succeeded / failed /
cancelled, and what makes a restarted control plane consistent (it simply looks again)."""

import logging

from sqlalchemy.orm import Session, sessionmaker

from service.launcher import JobState, Launcher
from service.models import RunRow
from service.repo import leader
from service.repo import runs as runs_repo
from service.state import RunStatus, transition
from service.tracking import Tracker

log = logging.getLogger(__name__)

ERROR_TAIL_LINES = 30

_FROM_RAY = {
    "PENDING": RunStatus.DISPATCHED,
    "RUNNING": RunStatus.RUNNING,
    "SUCCEEDED": RunStatus.SUCCEEDED,
    "FAILED": RunStatus.FAILED,
    "STOPPED": RunStatus.CANCELLED,
}


def error_tail(message: str, logs: str, lines: int = ERROR_TAIL_LINES) -> str:
    tail = "\n".join(logs.rstrip().splitlines()[-lines:])
    return (message.strip() + ("\n" + tail if tail else "")).strip()[-8000:]


class Reconciler:
    def __init__(self, sessions: sessionmaker[Session], launcher: Launcher, tracker: Tracker) -> None:
        self.sessions = sessions
        self.launcher = launcher
        self.tracker = tracker

    def tick(self) -> int:
        """One pass over every dispatched or running run; returns how many changed status (0
        while another replica reconciles: each transition is written by one process)."""
        with leader.leading(self.sessions, leader.RECONCILER) as held:
            return self._pass() if held else 0

    def _pass(self) -> int:
        changed = 0
        with self.sessions() as session:
            for row in runs_repo.active_rows(session):
                try:
                    changed += self._reconcile(row)
                    session.commit()
                except Exception as exc:
                    session.rollback()
                    log.warning("reconcile of run %s deferred: %s", row.id, exc)
        return changed

    def _reconcile(self, row: RunRow) -> int:
        sid = row.ray_submission_id
        assert sid is not None
        if row.cancel_requested:
            self.launcher.stop(sid)
        state = self.launcher.status(sid)
        if state is None:
            transition(row, RunStatus.FAILED, error=f"Ray job {sid} is gone (was the cluster restarted?)")
            self._close_mlflow(row, "FAILED")
            return 1
        target = _FROM_RAY.get(state.status, RunStatus(row.status))
        if target == RunStatus.DISPATCHED or target == RunStatus(row.status):
            return 0
        error = self._error_for(sid, state) if target == RunStatus.FAILED else None
        if target == RunStatus.SUCCEEDED and row.status == RunStatus.DISPATCHED:
            transition(row, RunStatus.RUNNING)
        transition(row, target, error=error)
        if target == RunStatus.FAILED:
            self._close_mlflow(row, "FAILED")
        elif target == RunStatus.CANCELLED:
            self._close_mlflow(row, "KILLED")
        log.info("run %s -> %s", row.id, target)
        return 1

    def _error_for(self, sid: str, state: JobState) -> str:
        try:
            logs = self.launcher.logs(sid)
        except Exception:
            logs = ""
        return error_tail(state.message, logs)

    def _close_mlflow(self, row: RunRow, status: str) -> None:
        if row.mlflow_run_id:
            try:
                self.tracker.close_if_open(row.mlflow_run_id, status)
            except Exception as exc:
                log.warning("could not close MLflow run %s: %s", row.mlflow_run_id, exc)
