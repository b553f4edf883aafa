"""/healthz, /readyz, /v1/info."""

from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import AuthDep, StateDep
from api.schemas import Info

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


@router.get("/readyz")
def readyz(state: StateDep) -> JSONResponse:
    """200 only when the database, Ray and MLflow all answer; 503 naming those that do not."""
    checks: dict[str, str] = {}
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    for name, ping in (("ray", state.launcher.ping), ("mlflow", state.tracker.ping)):
        try:
            ping()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    down = [k for k, v in checks.items() if v != "ok"]
    body = {"status": "ready" if not down else "not ready", "checks": checks,
            "unavailable": down}
    return JSONResponse(body, status_code=200 if not down else 503)


@router.get("/v1/info", response_model=Info, dependencies=[AuthDep])
def info(state: StateDep) -> Info:
    return Info(
        mlflow_tracking_uri=state.settings.mlflow_tracking_uri,
        ray_dashboard_url=state.launcher.dashboard_url(),
        versions={d: _version(d) for d in ("orchestra", "ray", "mlflow", "torch", "fastapi", "deepspeed")},
    )
