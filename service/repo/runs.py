"""Runs: read, the scheduler's queue, the reconciler's active set, cancellation requests."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.domain import Run
from service.models import RunRow
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
