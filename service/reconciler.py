"""The reconciler: Ray's view -> the database. The only writer of running / succeeded / failed /
cancelled, and what makes a restarted control plane consistent (it simply looks again).

When the Ray cluster stops answering, the active runs' states are unknown. They keep their status
for ``ray_lost_after_s`` (a head restart or a network blip comes back well within it); past that
they fail with the reason, so no run stays ``running`` forever behind a head that never returns.
Their jobs are remembered and stopped once a Ray head answers again (a head that kept its jobs
would otherwise run them to the end for nobody).
"""

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from service.failures import classify
from service.launcher import JobState, Launcher
from service.models import RunRow
from service.repo import leader
from service.repo import runs as runs_repo
from service.spec.retry import RetrySpec
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
    def __init__(self, sessions: sessionmaker[Session], launcher: Launcher, tracker: Tracker, *,
                 ray_lost_after_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.launcher = launcher
        self.tracker = tracker
        self.ray_lost_after_s = ray_lost_after_s
        self.clock = clock
        self._ray_silent_since: float | None = None
        self._orphans: set[str] = set()  # jobs of runs failed while Ray was away: stop when it answers

    def tick(self) -> int:
        """One pass over every dispatched or running run; returns how many changed status (0
        while another replica reconciles: each transition is written by one process)."""
        with leader.leading(self.sessions, leader.RECONCILER) as held:
            return self._pass() if held else 0

    def _pass(self) -> int:
        changed = 0
        with self.sessions() as session:
            rows = runs_repo.active_rows(session)
            if (rows or self._orphans) and not self._ray_answers():
                return self._fail_if_lost(session, rows)
            self._stop_orphans()
            for row in rows:
                try:
                    changed += self._reconcile(row)
                    session.commit()
                except Exception as exc:
                    session.rollback()
                    log.warning("reconcile of run %s deferred: %s", row.id, exc)
        return changed

    def _ray_answers(self) -> bool:
        try:
            self.launcher.ping()
        except Exception as exc:
            if self._ray_silent_since is None:
                log.warning("Ray does not answer (%s: %s); active runs fail after %.0f s of this",
                            type(exc).__name__, str(exc)[:200], self.ray_lost_after_s)
                self._ray_silent_since = self.clock()
            return False
        if self._ray_silent_since is not None:
            log.info("Ray answers again after %.0f s", self.clock() - self._ray_silent_since)
        self._ray_silent_since = None
        return True

    def _fail_if_lost(self, session: Session, rows: Sequence[RunRow]) -> int:
        assert self._ray_silent_since is not None
        silent = self.clock() - self._ray_silent_since
        if silent < self.ray_lost_after_s:
            return 0
        for row in rows:
            row.failure_kind = "node_lost"
            transition(row, RunStatus.FAILED, error=(
                f"the Ray cluster did not answer for {silent:.0f} s (limit {self.ray_lost_after_s:.0f} s): "
                "the run's state is unknown; its job is stopped if a Ray head answers again"))
            if row.ray_submission_id:
                self._orphans.add(row.ray_submission_id)
            session.commit()
            self._close_mlflow(row, "FAILED")
            log.warning("run %s failed: Ray unreachable for %.0f s", row.id, silent)
        return len(rows)

    def _stop_orphans(self) -> None:
        for sid in sorted(self._orphans):
            try:
                self.launcher.stop(sid)
            except Exception as exc:
                log.warning("could not stop job %s of a run failed while Ray was away: %s", sid, exc)
                continue
            self._orphans.discard(sid)

    def _reconcile(self, row: RunRow) -> int:
        sid = row.ray_submission_id
        assert sid is not None
        if row.cancel_requested:
            self.launcher.stop(sid)
        state = self.launcher.status(sid)
        if state is None:
            return self._failed(row, f"Ray job {sid} is gone (was the cluster restarted?)", "node_lost")
        target = _FROM_RAY.get(state.status, RunStatus(row.status))
        if target == RunStatus.DISPATCHED or target == RunStatus(row.status):
            return 0
        if target == RunStatus.FAILED:
            error = self._error_for(sid, state)
            return self._failed(row, error, classify(state.message, error))
        if target == RunStatus.SUCCEEDED and row.status == RunStatus.DISPATCHED:
            transition(row, RunStatus.RUNNING)
        transition(row, target)
        if target == RunStatus.CANCELLED:
            self._close_mlflow(row, "KILLED")
        elif target == RunStatus.SUCCEEDED:
            self._close_mlflow(row, "FINISHED")  # a command job's script does not close its run
        log.info("run %s -> %s", row.id, target)
        return 1

    def _failed(self, row: RunRow, error: str, kind: str) -> int:
        """The attempt's job failed with ``kind``: the run's next attempt where its retry policy
        says so (queued again; it resumes from the last checkpoint), else failed."""
        row.failure_kind = kind
        policy = row.experiment.resolved_spec.get("retry")
        if policy and not row.cancel_requested and RetrySpec.model_validate(policy).retries(kind, row.attempt):
            transition(row, RunStatus.QUEUED, error=f"attempt {row.attempt} failed ({kind}); attempt "
                       f"{row.attempt + 1} resumes from the last checkpoint:\n{error}"[:8000])
            row.attempt += 1
            row.ray_submission_id = None
            row.next_dispatch_at = None
            log.info("run %s: attempt %d failed (%s); queued again", row.id, row.attempt - 1, kind)
            return 1
        transition(row, RunStatus.FAILED, error=error)
        self._close_mlflow(row, "FAILED")
        log.info("run %s -> failed (%s)", row.id, kind)
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
