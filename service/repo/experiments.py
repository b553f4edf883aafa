"""Experiments: create (idempotently), read, list (keyset pagination)."""

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.domain import Experiment
from service.models import ExperimentRow, RunRow, TagRow


def new_id() -> str:
    return uuid.uuid4().hex


def create_experiment(
    session: Session, *, spec: dict[str, Any], resolved: dict[str, Any], idempotency_key: str | None = None,
    owner: str = "anonymous", gpus: float = 0.0, demand: dict[str, Any] | None = None,
) -> tuple[Experiment, bool]:
    """Store an experiment, its tags and its run as ``queued``. Returns (experiment, created)."""
    if idempotency_key is not None:
        existing = get_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return existing, False
    row = ExperimentRow(
        id=new_id(), name=resolved["name"], priority=resolved.get("priority", 0), spec=spec,
        resolved_spec=resolved, idempotency_key=idempotency_key, owner=owner,
        project=resolved.get("project", "default"),
    )
    row.tags = [TagRow(key=k, value=v) for k, v in (resolved.get("tags") or {}).items()]
    # One run per experiment: a sweep is one run whose job drives Ray Tune (a child run per trial).
    row.runs.append(RunRow(id=new_id(), index=0, status="queued", priority=row.priority, gpus=gpus,
                           demand=demand))
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


def delete_experiment(session: Session, experiment_id: str) -> None:
    """Remove the experiment, its runs and tags (the caller commits)."""
    row = session.get(ExperimentRow, experiment_id)
    if row is not None:
        session.delete(row)


def count_experiments(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ExperimentRow)) or 0


@dataclass(frozen=True)
class Filters:
    """What ``GET /v1/experiments`` narrows by; every field optional, all of them together (AND)."""

    project: str | None = None
    owner: str | None = None
    status: str | None = None
    tags: tuple[tuple[str, str], ...] = ()  # (key, value): each must be on the experiment
    name_prefix: str | None = None
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive


def _escape_like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(query: Select[Any], f: Filters) -> Select[Any]:
    if f.project is not None:
        query = query.where(ExperimentRow.project == f.project)
    if f.owner is not None:
        query = query.where(ExperimentRow.owner == f.owner)
    if f.status is not None:  # one run per experiment: its status is the experiment's
        query = query.where(select(RunRow.id).where(RunRow.experiment_id == ExperimentRow.id, RunRow.index == 0,
                                                    RunRow.status == f.status).exists())
    for key, value in f.tags:
        query = query.where(select(TagRow.experiment_id).where(
            TagRow.experiment_id == ExperimentRow.id, TagRow.key == key, TagRow.value == value).exists())
    if f.name_prefix:
        query = query.where(ExperimentRow.name.like(_escape_like(f.name_prefix) + "%", escape="\\"))
    if f.created_after is not None:
        query = query.where(ExperimentRow.created_at >= f.created_after)
    if f.created_before is not None:
        query = query.where(ExperimentRow.created_at < f.created_before)
    return query


def list_experiments(session: Session, *, limit: int, after: str | None = None,
                     filters: Filters = Filters()) -> tuple[list[Experiment], str | None]:
    """Newest first, narrowed by ``filters``. ``after`` is the ``next`` cursor of the previous page
    (an experiment id): pages are cut by (creation time, id), so experiments that arrive while a
    client pages never move what it has not read yet."""
    query = _where(select(ExperimentRow), filters).order_by(ExperimentRow.created_at.desc(), ExperimentRow.id.desc())
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
