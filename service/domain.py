"""Domain objects returned by the repository functions (never the database rows)."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.models import ExperimentRow, RunRow
from service.state import experiment_status


@dataclass(frozen=True)
class Run:
    id: str
    experiment_id: str
    index: int
    status: str
    mlflow_run_id: str | None
    ray_submission_id: str | None
    error: str | None
    waiting: str | None
    attempt: int
    failure_kind: str | None
    cancel_requested: bool
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: RunRow) -> "Run":
        return cls(
            id=row.id, experiment_id=row.experiment_id, index=row.index, status=row.status,
            mlflow_run_id=row.mlflow_run_id, ray_submission_id=row.ray_submission_id, error=row.error,
            waiting=row.waiting, attempt=row.attempt, failure_kind=row.failure_kind,
            cancel_requested=row.cancel_requested, created_at=row.created_at,
            dispatched_at=row.dispatched_at, started_at=row.started_at, finished_at=row.finished_at,
        )


@dataclass(frozen=True)
class Experiment:
    id: str
    name: str
    status: str
    priority: int
    spec: dict[str, Any]
    resolved_spec: dict[str, Any]
    owner: str
    project: str
    created_at: datetime
    runs: list[Run]

    @classmethod
    def of(cls, row: ExperimentRow) -> "Experiment":
        runs = [Run.of(r) for r in row.runs]
        return cls(
            id=row.id, name=row.name, status=experiment_status([r.status for r in runs]),
            priority=row.priority, spec=row.spec, resolved_spec=row.resolved_spec, owner=row.owner,
            project=row.project, created_at=row.created_at, runs=runs,
        )
