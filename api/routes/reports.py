"""/v1/experiments/{id}/report: the comparison report of an experiment's runs (and others'), as one
self-contained HTML page; also kept as the artifact ``report/report.html`` of its MLflow run."""

import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from api.deps import AuthDep, ExperimentId, SessionDep, StateDep
from api.errors import RETRY_AFTER_S, ApiError
from service.domain import Experiment
from service.repo import experiments as exp_repo
from service.report.build import check_names
from service.report.data import ReportError, TrackingUnavailable
from service.report.page import CONTENT_SECURITY_POLICY
from service.report.publish import mlflow_run_ids, report_html

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/experiments", tags=["reports"], dependencies=[AuthDep])
MAX_ITEMS = 20  # of each repeatable parameter: a page of 20 metrics or experiments is already a long read
_ERROR_BODY = "#/components/schemas/ErrorBody"
_ID = re.compile(r"[0-9a-f]{32}")  # an experiment id; anything else names nothing (and never reaches SQL)


def _error(why: str) -> dict[str, Any]:
    """An error response in the document: JSON, as every error of the API. (With a ``model``,
    FastAPI would document it as the route's own media type, text/html.)"""
    return {"description": why, "content": {"application/json": {"schema": {"$ref": _ERROR_BODY}}}}


@router.get(
    "/{experiment_id}/report", response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}},
                     "description": "the report: one HTML page, its plots embedded as PNG"},
               401: _error("no valid bearer token (when the API has tokens or users)"),
               404: _error("no such experiment (the path's, or one named in also)"),
               409: _error("no run of the experiments has reached MLflow yet (queued), or MLflow lost it"),
               422: _error("a parameter is invalid: a metric no trial logged, a path no trial has"),
               503: _error("the database or MLflow does not answer; see Retry-After")})
def experiment_report(
    experiment_id: ExperimentId, state: StateDep, session: SessionDep,
    metric: Annotated[list[str] | None, Query(description="a metric to report (repeat); default: train/loss "
                                              "and the eval/ metrics logged")] = None,
    group_by: Annotated[list[str] | None, Query(description="a spec path or block to group by (repeat); "
                                                "default: what the sweep ranged over but train.seed")] = None,
    also: Annotated[list[str] | None, Query(description="another experiment to include (repeat)")] = None,
    band: Annotated[Literal["std", "minmax"], Query(description="the curves' band: mean +- std, or min to "
                                                    "max")] = "std",
) -> HTMLResponse:
    """Compare the groups of the experiment's trials over seeds: curves, final and best values, the
    spec differences between groups. Viewers may read it."""
    for name, values in (("metric", metric), ("group_by", group_by), ("also", also)):
        if values and len(values) > MAX_ITEMS:
            raise ApiError(422, name, f"at most {MAX_ITEMS} values")
    experiments = [_experiment(session, experiment_id, "experiment_id")]
    experiments += [_experiment(session, other, "also") for other in dict.fromkeys(also or [])
                    if other != experiment_id]
    try:
        check_names(metric, group_by)
    except ReportError as exc:
        raise ApiError(exc.status, exc.field, str(exc)) from None
    run_ids = mlflow_run_ids(experiments)
    if not run_ids:
        raise ApiError(409, "experiment_id", "no run has an MLflow run yet: the experiment is queued")
    try:
        state.tracker.ping()  # fail fast: MLflow's client would retry a down server for minutes
    except Exception as exc:
        log.warning("report of %s: MLflow does not answer: %s: %s", experiment_id, type(exc).__name__, str(exc)[:200])
        raise _mlflow_unavailable() from None
    try:
        page = report_html(state.tracker.uri, run_ids, metrics=metric, group_by=group_by, band=band,
                           title=f"Report: {', '.join(e.name for e in experiments)}",
                           subtitle=", ".join(f"{e.name} ({e.id[:8]}, {e.status})" for e in experiments))
    except ReportError as exc:
        raise ApiError(exc.status, exc.field, str(exc)) from None
    except TrackingUnavailable as exc:
        log.warning("report of %s: %s", experiment_id, exc)
        raise _mlflow_unavailable() from None
    return HTMLResponse(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


def _experiment(session: Session, experiment_id: str, field: str) -> Experiment:
    exp = exp_repo.get_experiment(session, experiment_id) if _ID.fullmatch(experiment_id) else None
    if exp is None:
        raise ApiError(404, field, f"no experiment {experiment_id[:64]!r}")
    return exp


def _mlflow_unavailable() -> ApiError:
    return ApiError(503, "mlflow", "MLflow does not answer; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
