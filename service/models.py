"""Database rows (SQLAlchemy 2). The API never returns these: repo functions turn them into
domain objects (``service.domain``)."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ExperimentRow(Base):
    __tablename__ = "experiments"
    # the listing's orders (newest first), whole and by project or owner: each a walk of one index
    __table_args__ = (Index("ix_experiments_created", "created_at", "id"),
                      Index("ix_experiments_project_created", "project", "created_at", "id"),
                      Index("ix_experiments_owner_created", "owner", "created_at", "id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    resolved_spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    owner: Mapped[str] = mapped_column(String(64), default="anonymous")
    project: Mapped[str] = mapped_column(String(64), default="default")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # deleting an experiment deletes its runs and tags (ON DELETE CASCADE in the database)
    runs: Mapped[list["RunRow"]] = relationship(
        back_populates="experiment", order_by="RunRow.index", lazy="selectin", cascade="all, delete-orphan",
        passive_deletes=True,
    )
    tags: Mapped[list["TagRow"]] = relationship(cascade="all, delete-orphan", lazy="noload", passive_deletes=True)


class TagRow(Base):
    """The spec's tags, one row each, for search (the spec keeps them too)."""

    __tablename__ = "experiment_tags"
    __table_args__ = (Index("ix_experiment_tags_key_value", "key", "value", "experiment_id"),)

    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))


class AuditRow(Base):
    """Who changed what, and when: every submission, cancellation (and later deletion, resume)."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_at", "at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_status_priority", "status", "priority", "created_at"),
                      Index("ix_runs_dispatched_at", "dispatched_at"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    ray_submission_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    dispatch_attempts: Mapped[int] = mapped_column(Integer, default=0)
    gpus: Mapped[float] = mapped_column(Float, default=0.0)  # held while active (service.spec.derived.gpus_held)
    waiting: Mapped[str | None] = mapped_column(String(200), nullable=True)  # why a queued run is not dispatched
    attempt: Mapped[int] = mapped_column(Integer, default=1)  # 1, then one more per retry (its own Ray job)
    failure_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)  # service.failures
    # what the job claims from the cluster: {"bundle": {resource: amount}, "count": n} (derived.demand)
    demand: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    next_dispatch_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    experiment: Mapped[ExperimentRow] = relationship(back_populates="runs")
