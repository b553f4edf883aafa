"""/v1/runs: a run and the tail of its Ray job's logs."""

import logging
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AuthDep, RunId, SessionDep, StateDep, UserDep, require_manager
from api.errors import ApiError
from api.openapi import errors
from api.schemas import RunLogs, RunPublic
from service.repo import audit
from service.repo import runs as runs_repo
from service.state import IllegalTransition, resume

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[AuthDep], responses=errors(401, 404, 422, 503))


@router.post("/{run_id}/resume", status_code=202, response_model=RunPublic, responses=errors(403, 409))
def resume_run(run_id: RunId, state: StateDep, session: SessionDep, user: UserDep) -> RunPublic:
    """Continue a failed or cancelled run from its last checkpoint, as its next attempt (the same
    MLflow run goes on). Members resume their own runs; admins any."""
    row = runs_repo.get_run_row(session, run_id)
    if row is None:
        raise ApiError(404, "run_id", f"no run {run_id!r}")
    require_manager(user, row.experiment.owner, f"run {run_id}")
    try:
        resume(row, note=f"resumed by {user.name} after attempt {row.attempt} ({row.status})")
    except IllegalTransition as exc:
        raise ApiError(409, "status", str(exc)) from None
    audit.record(session, actor=user.name, action="resume", target=row.experiment_id, detail=f"run {run_id}")
    session.commit()
    if state.control is not None:
        state.control.wake()
    run = runs_repo.get_run(session, run_id)
    assert run is not None
    return RunPublic.of(run)


@router.get("/{run_id}", response_model=RunPublic)
def get_run(run_id: RunId, session: SessionDep) -> RunPublic:
    run = runs_repo.get_run(session, run_id)
    if run is None:
        raise ApiError(404, "run_id", f"no run {run_id!r}")
    return RunPublic.of(run)


@router.get("/{run_id}/logs", response_model=RunLogs)
def get_run_logs(
    run_id: RunId, session: SessionDep, state: StateDep,
    tail: Annotated[int, Query(ge=1, le=100_000)] = 200,
) -> RunLogs:
    run = runs_repo.get_run(session, run_id)
    if run is None:
        raise ApiError(404, "run_id", f"no run {run_id!r}")
    text = ""
    if run.ray_submission_id:
        try:
            text = state.launcher.logs(run.ray_submission_id)
        except Exception as exc:
            log.warning("logs of %s: %s: %s", run.ray_submission_id, type(exc).__name__, str(exc)[:300])
            raise ApiError(503, "ray", "could not read the job's logs from Ray; retry later",
                           headers={"Retry-After": "5"}) from None
    lines = text.splitlines()[-tail:]
    return RunLogs(run_id=run.id, status=run.status, logs="\n".join(lines))
