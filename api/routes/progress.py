"""/v1/experiments/{id}/progress: each run's step, rate, latest metrics and time left (a sweep's
trials too), read from MLflow at the request."""

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import AuthDep, ExperimentId, SessionDep, StateDep
from api.errors import ApiError
from api.openapi import errors
from service.progress import RunProgress, experiment_progress
from service.repo import experiments as exp_repo

router = APIRouter(prefix="/v1/experiments", tags=["experiments"], dependencies=[AuthDep],
                   responses=errors(401, 422, 503))


class ExperimentProgress(BaseModel):
    experiment_id: str
    status: str
    runs: list[RunProgress]


@router.get("/{experiment_id}/progress", response_model=ExperimentProgress, responses=errors(404))
def get_progress(experiment_id: ExperimentId, state: StateDep, session: SessionDep) -> ExperimentProgress:
    """Where each run is: its status, and its progress from MLflow (step of train.max_steps, steps
    per second, the latest train/loss and evaluation metric, the time left; a sweep's trials). A
    run not started is at step 0; while MLflow does not answer, a run's progress is null with the
    reason, and the answer still comes within seconds."""
    exp = exp_repo.get_experiment(session, experiment_id)
    if exp is None:
        raise ApiError(404, "experiment_id", f"no experiment {experiment_id!r}")
    # MLflow's reads may take seconds: the database connection goes back to the pool first.
    session.close()
    runs = experiment_progress(state.tracker, exp.resolved_spec, exp.runs)
    return ExperimentProgress(experiment_id=exp.id, status=exp.status, runs=runs)
