"""The run's life as a state machine: one transition function, terminal states final (only an
explicit ``resume`` starts a failed or cancelled run again, as its next attempt)."""

from datetime import UTC, datetime
from enum import StrEnum

from service.models import RunRow


class RunStatus(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
ACTIVE = frozenset({RunStatus.DISPATCHED, RunStatus.RUNNING})

# An active run goes back to queued when its job failed and its retry policy starts another attempt.
ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.DISPATCHED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.DISPATCHED: frozenset(
        {RunStatus.RUNNING, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.QUEUED}
    ),
    RunStatus.RUNNING: frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.QUEUED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def transition(run: RunRow, to: RunStatus, *, error: str | None = None) -> bool:
    """Move ``run`` to ``to``. Returns False when already there; raises on an illegal move."""
    current = RunStatus(run.status)
    if current == to:
        return False
    if to not in ALLOWED[current]:
        raise IllegalTransition(f"run {run.id}: {current} -> {to} is not allowed")
    now = datetime.now(UTC)
    run.status = to.value
    if to == RunStatus.DISPATCHED:
        run.dispatched_at = now
    elif to == RunStatus.RUNNING:
        run.started_at = now
    elif to in TERMINAL:
        run.finished_at = now
        if run.started_at is None and to == RunStatus.SUCCEEDED:
            run.started_at = now
    if error is not None:
        run.error = error
    return True


def experiment_status(statuses: list[str]) -> str:
    """An experiment's status from its runs': the least advanced active one, else the final one."""
    s = [RunStatus(x) for x in statuses]
    for status in (RunStatus.RUNNING, RunStatus.DISPATCHED, RunStatus.QUEUED):
        if status in s:
            return status.value
    for status in (RunStatus.FAILED, RunStatus.CANCELLED):
        if status in s:
            return status.value
    return RunStatus.SUCCEEDED.value if s else RunStatus.QUEUED.value


RESUMABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})


def resume(run: RunRow, *, note: str) -> None:
    """A failed or cancelled run queued again as its next attempt (a Ray job of its own, resuming
    from the run's last checkpoint)."""
    current = RunStatus(run.status)
    if current not in RESUMABLE:
        raise IllegalTransition(f"run {run.id} is {current}: only a failed or cancelled run resumes")
    run.status = RunStatus.QUEUED.value
    run.attempt += 1
    run.cancel_requested = False
    run.ray_submission_id = None
    run.next_dispatch_at = None
    run.dispatch_attempts = 0
    run.finished_at = None
    run.error = note
