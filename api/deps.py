"""FastAPI dependencies: the app's state, a DB session per request, bearer-token auth."""

import hmac
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from service.bundles import BundleStore
from service.control import ControlLoop
from service.launcher import Launcher
from service.readiness import Readiness
from service.settings import Settings
from service.tracking import Tracker


@dataclass
class AppState:
    settings: Settings
    sessions: sessionmaker[Session]
    launcher: Launcher
    tracker: Tracker
    control: ControlLoop | None
    readiness: Readiness
    bundles: BundleStore


# The dependencies that do no I/O are coroutines: FastAPI runs a plain function in its thread pool,
# one hand-over per dependency and request, which under a burst costs more than the work itself.

async def get_state(request: Request) -> AppState:
    return request.app.state.orchestra  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(get_state)]

# Ids are 32 hex characters (uuid4().hex). Anything else names nothing: a 404 before the database
# sees it (a NUL byte in a query is an error on PostgreSQL).
_ID = re.compile(r"[0-9a-f]{32}")


def known_shape(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise ApiError(404, f"{kind}_id", f"no {kind} {value[:64]!r}")
    return value


async def _experiment_id(experiment_id: Annotated[str, Path()]) -> str:
    return known_shape("experiment", experiment_id)


async def _run_id(run_id: Annotated[str, Path()]) -> str:
    return known_shape("run", run_id)


ExperimentId = Annotated[str, Depends(_experiment_id)]
RunId = Annotated[str, Depends(_run_id)]


async def get_session(state: StateDep) -> AsyncIterator[Session]:
    """A session per request. Opening one does no I/O (it connects on first use, in the handler's
    thread); closing it may (a rollback), so that goes to the thread pool."""
    session = state.sessions()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]


_bearer = HTTPBearer(auto_error=False, description="one of ORCHESTRA_API_TOKENS (when set)")


async def require_token(state: StateDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    tokens = state.settings.tokens
    if not tokens:
        return
    given = credentials.credentials if credentials is not None else ""
    if not given:
        raise ApiError(401, "authorization", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    # Compare against every token in constant time; never log the value.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not ok:
        raise ApiError(401, "authorization", "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


AuthDep = Depends(require_token)
