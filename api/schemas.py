"""Response schemas: what the API returns (never the database rows)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from service.domain import Experiment, Run


class RunPublic(BaseModel):
    id: str
    experiment_id: str
    status: str
    mlflow_run_id: str | None
    ray_submission_id: str | None
    error: str | None
    cancel_requested: bool
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, run: Run) -> "RunPublic":
        return cls.model_validate(run, from_attributes=True)


class ExperimentPublic(BaseModel):
    id: str
    name: str
    status: str
    priority: int
    created_at: datetime
    spec: dict[str, Any]
    runs: list[RunPublic]

    @classmethod
    def of(cls, exp: Experiment) -> "ExperimentPublic":
        return cls(id=exp.id, name=exp.name, status=exp.status, priority=exp.priority,
                   created_at=exp.created_at, spec=exp.resolved_spec, runs=[RunPublic.of(r) for r in exp.runs])


class ExperimentPage(BaseModel):
    items: list[ExperimentPublic]
    next: str | None


class RunLogs(BaseModel):
    run_id: str
    status: str
    logs: str


class Info(BaseModel):
    mlflow_tracking_uri: str
    ray_dashboard_url: str
    versions: dict[str, str]


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    detail: list[FieldError]
