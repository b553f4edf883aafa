"""Runs: read, the scheduler's queue, the reconciler's active set, cancellation requests."""

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.domain import Run
from service.models import ExperimentRow, RunRow
from service.quotas import Candidate, Usage
from service.state import ACTIVE, TERMINAL, RunStatus


def get_run(session: Session, run_id: str) -> Run | None:
    row = session.get(RunRow, run_id)
    return Run.of(row) if row else None


def get_run_row(session: Session, run_id: str) -> RunRow | None:
    return session.get(RunRow, run_id)


def queued_rows(session: Session, limit: int, *, due_before: datetime | None = None) -> Sequence[RunRow]:
    """Queued runs by priority (high first), then FIFO; with ``due_before``, only those whose
    retry delay (after a refused dispatch) has passed."""
    query = select(RunRow).where(RunRow.status == RunStatus.QUEUED.value)
    if due_before is not None:
        query = query.where(or_(RunRow.next_dispatch_at.is_(None), RunRow.next_dispatch_at <= due_before))
    query = query.order_by(RunRow.priority.desc(), RunRow.created_at, RunRow.id).limit(limit)
    return session.scalars(query).all()


def lock_queued(session: Session, run_id: str) -> RunRow | None:
    """The run if it is still queued and not being dispatched by another scheduler; locked for
    this transaction on PostgreSQL (SKIP LOCKED: a row another process holds is skipped)."""
    query = select(RunRow).where(RunRow.id == run_id, RunRow.status == RunStatus.QUEUED.value)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return session.scalars(query).first()


def active_rows(session: Session) -> Sequence[RunRow]:
    return session.scalars(select(RunRow).where(RunRow.status.in_([s.value for s in ACTIVE]))).all()


def count_active(session: Session) -> int:
    return len(active_rows(session))


def cancel_requested_queued(session: Session) -> Sequence[RunRow]:
    return session.scalars(
        select(RunRow).where(RunRow.status == RunStatus.QUEUED.value, RunRow.cancel_requested.is_(True))
    ).all()


def request_cancel(session: Session, experiment_id: str) -> int:
    """Mark every unfinished run of the experiment; the reconciler does the stopping."""
    result = session.execute(
        update(RunRow)
        .where(RunRow.experiment_id == experiment_id, RunRow.status.not_in([s.value for s in TERMINAL]))
        .values(cancel_requested=True)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def queued_candidates(session: Session, *, due_before: datetime, limit: int = 5000) -> list[Candidate]:
    """The queued runs due for dispatch, with what the quotas and the fair order read (no JSON)."""
    query = (select(RunRow.id, ExperimentRow.owner, ExperimentRow.project, RunRow.gpus, RunRow.priority,
                    RunRow.created_at, RunRow.demand)
             .join(ExperimentRow, RunRow.experiment_id == ExperimentRow.id)
             .where(RunRow.status == RunStatus.QUEUED.value, RunRow.cancel_requested.is_(False),
                    or_(RunRow.next_dispatch_at.is_(None), RunRow.next_dispatch_at <= due_before))
             .order_by(RunRow.priority.desc(), RunRow.created_at, RunRow.id).limit(limit))
    return [Candidate(*row) for row in session.execute(query)]


def usage(session: Session, *, served_since: datetime) -> Usage:
    """Active runs and their GPUs per user and per project, what they claim from the cluster, and
    each user's latest dispatch since
    ``served_since`` (the fair order's memory)."""
    out = Usage()
    active = (select(ExperimentRow.owner, ExperimentRow.project, RunRow.gpus, RunRow.demand)
              .join(ExperimentRow, RunRow.experiment_id == ExperimentRow.id)
              .where(RunRow.status.in_([s.value for s in ACTIVE])))
    for owner, project, gpus, claim in session.execute(active):
        out.add(owner, project, gpus, claim)
    served = (select(ExperimentRow.owner, func.max(RunRow.dispatched_at))
              .join(ExperimentRow, RunRow.experiment_id == ExperimentRow.id)
              .where(RunRow.dispatched_at >= served_since).group_by(ExperimentRow.owner))
    for owner, at in session.execute(served):
        if at is not None:  # SQLite hands times back without their offset
            out.last_served[owner] = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return out


def set_waiting(session: Session, reasons: dict[str, str | None]) -> None:
    """Record why each run waits (None: it does not), writing only the rows whose reason changed."""
    if not reasons:
        return
    current = dict(session.execute(select(RunRow.id, RunRow.waiting).where(RunRow.id.in_(list(reasons)))).all())
    for run_id, reason in reasons.items():
        if run_id in current and current[run_id] != reason:
            session.execute(update(RunRow).where(RunRow.id == run_id, RunRow.status == RunStatus.QUEUED.value)
                            .values(waiting=reason))
