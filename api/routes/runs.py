"""/v1/runs: a run and the tail of its Ray job's logs."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from api.deps import AuthDep, RunId, SessionDep, StateDep
from api.schemas import RunLogs, RunPublic
from service.repo import runs as runs_repo

router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[AuthDep])


@router.get("/{run_id}", response_model=RunPublic)
def get_run(run_id: RunId, session: SessionDep) -> RunPublic:
    run = runs_repo.get_run(session, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return RunPublic.of(run)


@router.get("/{run_id}/logs", response_model=RunLogs)
def get_run_logs(
    run_id: RunId, session: SessionDep, state: StateDep,
    tail: Annotated[int, Query(ge=1, le=100_000)] = 200,
) -> RunLogs:
    run = runs_repo.get_run(session, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    text = ""
    if run.ray_submission_id:
        try:
            text = state.launcher.logs(run.ray_submission_id)
        except Exception as exc:
            raise HTTPException(503, f"ray: could not read the job's logs: {exc}") from None
    lines = text.splitlines()[-tail:]
    return RunLogs(run_id=run.id, status=run.status, logs="\n".join(lines))
