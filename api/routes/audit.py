"""/v1/audit: who changed what, and when (admins only), newest first."""

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AuthDep, SessionDep, UserDep, require_admin
from api.openapi import errors
from api.schemas import AuditEntry, AuditPage
from service.repo import audit

router = APIRouter(prefix="/v1/audit", tags=["audit"], dependencies=[AuthDep], responses=errors(401, 403, 422, 503))


@router.get("", response_model=AuditPage)
def read_audit(session: SessionDep, user: UserDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               before: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="the `next` of the previous page")]
               = None) -> AuditPage:
    require_admin(user)
    rows, nxt = audit.page(session, limit=limit, before=before)
    return AuditPage(items=[AuditEntry.model_validate(r, from_attributes=True) for r in rows], next=nxt)
