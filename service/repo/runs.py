"""Runs: read, the scheduler's queue, the reconciler's active set, cancellation requests."""

from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.domain import Run
from service.models import RunRow
from service.state import ACTIVE, TERMINAL, RunStatus


def get_run(session: Session, run_id: str) -> Run | None:
    row = session.get(RunRow, run_id)
    return Run.of(row) if row else None


def get_run_row(session: Session, run_id: str) -> RunRow | None:
    return session.get(RunRow, run_id)


def queued_rows(session: Session, limit: int) -> Sequence[RunRow]:
    """Queued runs by priority (high first), then FIFO. Locks them on Postgres (SKIP LOCKED)."""
    query = (
        select(RunRow)
        .where(RunRow.status == RunStatus.QUEUED.value)
        .order_by(RunRow.priority.desc(), RunRow.created_at, RunRow.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return session.scalars(query).all()


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
