"""Response schemas: what the API returns (never the database rows)."""

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel

from service.domain import Experiment, Run


def _utc(value: datetime) -> datetime:
    """Times are stored in UTC; SQLite returns them without an offset, which RFC 3339's
    date-time (the OpenAPI format) requires."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Timestamp = Annotated[datetime, AfterValidator(_utc)]


class RunPublic(BaseModel):
    id: str
    experiment_id: str
    status: str
    mlflow_run_id: str | None
    ray_submission_id: str | None
    error: str | None
    waiting: str | None  # why a queued run is not dispatched yet (a quota, the concurrency limit)
    attempt: int  # 1, then one more per retry
    failure_kind: str | None  # oom | node_lost | nccl | preempted | user_error: the last failure's
    cancel_requested: bool
    created_at: Timestamp
    dispatched_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None

    @classmethod
    def of(cls, run: Run) -> "RunPublic":
        return cls.model_validate(run, from_attributes=True)


class ExperimentPublic(BaseModel):
    id: str
    name: str
    status: str
    priority: int
    owner: str
    project: str
    created_at: Timestamp
    spec: dict[str, Any]
    runs: list[RunPublic]

    @classmethod
    def of(cls, exp: Experiment) -> "ExperimentPublic":
        return cls(id=exp.id, name=exp.name, status=exp.status, priority=exp.priority, owner=exp.owner,
                   project=exp.project, created_at=exp.created_at, spec=exp.resolved_spec,
                   runs=[RunPublic.of(r) for r in exp.runs])


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


class ReadinessBody(BaseModel):
    status: str  # "ready" | "not ready"
    checks: dict[str, str]  # dependency -> "ok" | "unavailable"
    unavailable: list[str]


class AuditEntry(BaseModel):
    id: int
    at: Timestamp
    actor: str
    action: str  # submit | cancel | delete | resume
    target: str  # the experiment's id
    detail: str | None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next: int | None  # the `before` of the next (older) page


class BundlePublic(BaseModel):
    hash: str  # SHA-256 of the zip: the spec's code.bundle
    size: int
    files: int
