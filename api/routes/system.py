"""/healthz, /readyz, /v1/info."""

from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import AuthDep, StateDep
from api.openapi import errors
from api.schemas import Info, ReadinessBody

router = APIRouter(tags=["system"])


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadinessBody,
            responses={503: {"model": ReadinessBody, "description": "a dependency does not answer"}})
async def readyz(state: StateDep) -> JSONResponse:
    """200 when the database, Ray and MLflow all answer; 503 naming those that do not. Answers
    within about a second whatever is down, and never runs a check in the request thread pool."""
    down = await state.readiness.down()
    checks = {name: ("unavailable" if name in down else "ok") for name in state.readiness.checks}
    body = {"status": "ready" if not down else "not ready", "checks": checks, "unavailable": down}
    return JSONResponse(body, status_code=200 if not down else 503)


@router.get("/v1/info", response_model=Info, dependencies=[AuthDep], responses=errors(401))
def info(state: StateDep) -> Info:
    return Info(
        mlflow_tracking_uri=state.settings.mlflow_tracking_uri,
        ray_dashboard_url=state.launcher.dashboard_url(),
        versions={d: _version(d) for d in ("orchestra", "ray", "mlflow", "torch", "fastapi", "deepspeed")},
    )
