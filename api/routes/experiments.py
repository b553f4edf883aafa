"""/v1/experiments: submit (JSON or YAML, idempotent), list, read, cancel."""

import json
import logging
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import AuthDep, ExperimentId, SessionDep, StateDep, UserDep, known_shape, require_manager, require_writer
from api.errors import ApiError
from api.openapi import errors, spec_request_body
from api.schemas import ExperimentPage, ExperimentPublic
from service.domain import Experiment
from service.repo import audit
from service.repo import experiments as exp_repo
from service.repo import runs as runs_repo
from service.spec import ExperimentSpec
from service.spec.derived import demand, gpus_held
from service.spec.model import PROJECT_PATTERN
from service.spec.parse import SpecError, load_document, validate_document
from service.state import TERMINAL, RunStatus
from service.users import USER_PATTERN

router = APIRouter(prefix="/v1/experiments", tags=["experiments"], dependencies=[AuthDep],
                   responses=errors(401, 422, 503))
log = logging.getLogger(__name__)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@router.post("", status_code=201, response_model=ExperimentPublic, responses=errors(400, 403, 409, 413),
             openapi_extra={"requestBody": spec_request_body()})
async def submit_experiment(
    request: Request, response: Response, state: StateDep, session: SessionDep, user: UserDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> ExperimentPublic:
    """Validate the spec (JSON, or YAML with Content-Type application/yaml) and queue its run; the
    caller owns it. Viewers cannot submit (403)."""
    require_writer(user)
    body = await request.body()
    content_type = request.headers.get("content-type", "application/json")

    def validate() -> tuple[dict[str, Any], ExperimentSpec]:  # CPU work (a sweep's trials): off the loop
        raw = load_document(body, content_type)
        # The limit holds for what is stored, after YAML's aliases are expanded, not only the body.
        if len(json.dumps(raw, separators=(",", ":"))) > state.settings.max_body_bytes:
            raise SpecError([{"field": "body", "message": f"the spec is over {state.settings.max_body_bytes} "
                              "bytes once expanded"}], 413)
        spec = validate_document(raw)
        bundle = spec.code.bundle if spec.code is not None else None
        if bundle is not None and not state.bundles.exists(bundle):
            raise SpecError([{"field": "code.bundle", "message": f"no bundle {bundle}: upload the code first "
                              "(POST /v1/bundles, or orchestra submit --code DIR)"}])
        return raw, spec

    raw, spec = await run_in_threadpool(validate)

    def store() -> tuple[Experiment, bool]:  # blocking database work: off the event loop
        exp, created = exp_repo.create_experiment(session, spec=raw, resolved=spec.resolved(),
                                                  idempotency_key=idempotency_key, owner=user.name,
                                                  gpus=gpus_held(spec), demand=demand(spec))
        if created:
            audit.record(session, actor=user.name, action="submit", target=exp.id,
                         detail=f"{exp.project}/{exp.name}")
            session.commit()
        return exp, created

    exp, created = await run_in_threadpool(store)
    if not created and exp.resolved_spec != spec.resolved():  # the same spec, however it was written
        raise ApiError(409, "Idempotency-Key", "already used with a different spec")
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    elif state.control is not None:
        state.control.wake()
    return ExperimentPublic.of(exp)


@router.get("", response_model=ExperimentPage, responses=errors(400))
def list_experiments(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64, description="the `next` of the previous page")] = None,
    after: Annotated[str | None, Query(max_length=64, description="the same as `cursor` (its older name)")] = None,
    project: Annotated[str | None, Query(pattern=PROJECT_PATTERN)] = None,
    owner: Annotated[str | None, Query(pattern=USER_PATTERN)] = None,
    status: Annotated[RunStatus | None, Query()] = None,
    tag: Annotated[list[str] | None, Query(max_length=20, description="key:value, repeatable (all must match)")] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=128, description="a prefix of the name")] = None,
    created_after: Annotated[datetime | None, Query(description="inclusive")] = None,
    created_before: Annotated[datetime | None, Query(description="exclusive")] = None,
) -> ExperimentPage:
    """Newest first; the filters narrow together. Pages follow `next` (as `cursor`)."""
    after = cursor or after
    tags = []
    for item in tag or []:
        key, sep, value = item.partition(":")
        if not sep or not key or len(key) > 128 or len(value) > 512 or _CONTROL.search(item):
            raise ApiError(422, "tag", f"{item[:80]!r}: a tag filter is key:value")
        tags.append((key, value))
    filters = exp_repo.Filters(project=project, owner=owner, status=status.value if status else None,
                               tags=tuple(tags), name_prefix=name, created_after=created_after,
                               created_before=created_before)
    if name is not None and _CONTROL.search(name):
        raise ApiError(422, "name", "a name has no control characters")
    try:
        if after is not None:
            known_shape("experiment", after)
        items, nxt = exp_repo.list_experiments(session, limit=limit, after=after, filters=filters)
    except (KeyError, ApiError):
        raise ApiError(400, "cursor", f"no experiment {after!r}") from None
    return ExperimentPage(items=[ExperimentPublic.of(e) for e in items], next=nxt)


@router.get("/{experiment_id}", response_model=ExperimentPublic, responses=errors(404))
def get_experiment(experiment_id: ExperimentId, session: SessionDep) -> ExperimentPublic:
    exp = exp_repo.get_experiment(session, experiment_id)
    if exp is None:
        raise ApiError(404, "experiment_id", f"no experiment {experiment_id!r}")
    return ExperimentPublic.of(exp)


@router.post("/{experiment_id}/cancel", status_code=202, response_model=ExperimentPublic,
             responses=errors(403, 404))
def cancel_experiment(experiment_id: ExperimentId, state: StateDep, session: SessionDep,
                      user: UserDep) -> ExperimentPublic:
    """Ask for every unfinished run to stop; the reconciler stops the Ray jobs and records it.
    Members cancel their own experiments; admins any."""
    current = exp_repo.get_experiment(session, experiment_id)
    if current is None:
        raise ApiError(404, "experiment_id", f"no experiment {experiment_id!r}")
    require_manager(user, current.owner, f"experiment {experiment_id}")
    runs_repo.request_cancel(session, experiment_id)
    audit.record(session, actor=user.name, action="cancel", target=experiment_id)
    session.commit()
    if state.control is not None:
        state.control.wake()
    exp = exp_repo.get_experiment(session, experiment_id)
    assert exp is not None
    return ExperimentPublic.of(exp)


@router.delete("/{experiment_id}", status_code=204, responses=errors(403, 404, 409))
def delete_experiment(experiment_id: ExperimentId, state: StateDep, session: SessionDep, user: UserDep) -> Response:
    """Remove a finished experiment (succeeded, failed or cancelled) and mark its MLflow runs
    deleted. Members delete their own; admins any."""
    exp = exp_repo.get_experiment(session, experiment_id)
    if exp is None:
        raise ApiError(404, "experiment_id", f"no experiment {experiment_id!r}")
    require_manager(user, exp.owner, f"experiment {experiment_id}")
    if exp.status not in {s.value for s in TERMINAL}:
        raise ApiError(409, "status", f"experiment {experiment_id} is {exp.status}: cancel it and wait for the end "
                       "before deleting it")
    for run in exp.runs:
        if run.mlflow_run_id:
            try:
                state.tracker.delete_runs(run.mlflow_run_id)
            except Exception as exc:  # nothing is deleted here until MLflow has deleted its runs
                log.warning("deleting MLflow run %s: %s: %s", run.mlflow_run_id, type(exc).__name__, str(exc)[:300])
                raise ApiError(503, "mlflow", "could not delete the MLflow runs; retry later",
                               headers={"Retry-After": "5"}) from None
    exp_repo.delete_experiment(session, experiment_id)
    audit.record(session, actor=user.name, action="delete", target=experiment_id, detail=f"{exp.project}/{exp.name}")
    session.commit()
    return Response(status_code=204)
