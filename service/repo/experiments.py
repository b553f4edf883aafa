"""Experiments: create (idempotently), read, list (keyset pagination)."""

import uuid
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.domain import Experiment
from service.models import ExperimentRow, RunRow


def new_id() -> str:
    return uuid.uuid4().hex


def create_experiment(
    session: Session, *, spec: dict[str, Any], resolved: dict[str, Any], idempotency_key: str | None = None
) -> tuple[Experiment, bool]:
    """Store an experiment and its run as ``queued``. Returns (experiment, created)."""
    if idempotency_key is not None:
        existing = get_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return existing, False
    row = ExperimentRow(
        id=new_id(), name=resolved["name"], priority=resolved.get("priority", 0), spec=spec,
        resolved_spec=resolved, idempotency_key=idempotency_key,
    )
    # One run per experiment: a sweep is one run whose job drives Ray Tune (a child run per trial).
    row.runs.append(RunRow(id=new_id(), index=0, status="queued", priority=row.priority))
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = get_by_idempotency_key(session, idempotency_key)
        if existing is None:
            raise
        return existing, False
    return Experiment.of(row), True


def get_by_idempotency_key(session: Session, key: str) -> Experiment | None:
    row = session.scalars(select(ExperimentRow).where(ExperimentRow.idempotency_key == key)).first()
    return Experiment.of(row) if row else None


def get_experiment(session: Session, experiment_id: str) -> Experiment | None:
    row = session.get(ExperimentRow, experiment_id)
    return Experiment.of(row) if row else None


def count_experiments(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ExperimentRow)) or 0


def list_experiments(session: Session, *, limit: int, after: str | None = None) -> tuple[list[Experiment], str | None]:
    """Newest first. ``after`` is the ``next`` cursor of the previous page (an experiment id)."""
    query = select(ExperimentRow).order_by(ExperimentRow.created_at.desc(), ExperimentRow.id.desc())
    if after:
        anchor = session.get(ExperimentRow, after)
        if anchor is None:
            raise KeyError(after)
        query = query.where(
            tuple_(ExperimentRow.created_at, ExperimentRow.id) < tuple_(anchor.created_at, anchor.id)
        )
    rows = list(session.scalars(query.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return [Experiment.of(r) for r in rows], (rows[-1].id if more and rows else None)
