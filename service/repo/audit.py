"""The audit log: one row per change (who, what, which experiment, when), newest first."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import AuditRow


def record(session: Session, *, actor: str, action: str, target: str, detail: str | None = None) -> None:
    """Add the entry to the session's transaction: it commits with the change it records."""
    session.add(AuditRow(actor=actor, action=action, target=target, detail=detail))


def page(session: Session, *, limit: int, before: int | None = None) -> tuple[list[AuditRow], int | None]:
    query = select(AuditRow).order_by(AuditRow.id.desc())
    if before is not None:
        query = query.where(AuditRow.id < before)
    rows = list(session.scalars(query.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)
