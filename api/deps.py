"""FastAPI dependencies: the app's state, a DB session per request, bearer-token auth."""

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
from service.users import ANONYMOUS, Directory, Role, User


@dataclass
class AppState:
    settings: Settings
    sessions: sessionmaker[Session]
    launcher: Launcher
    tracker: Tracker
    control: ControlLoop | None
    readiness: Readiness
    bundles: BundleStore
    users: Directory


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


_bearer = HTTPBearer(auto_error=False, description="a user's token (ORCHESTRA_USERS_FILE) or one of "
                     "ORCHESTRA_API_TOKENS, when either is set")


async def current_user(state: StateDep,
                       credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    """The caller: the user whose token this is (401 without a known one), or the admin
    ``anonymous`` when the API has no users. Never logs the token."""
    if not state.users.enabled:
        return ANONYMOUS
    given = credentials.credentials if credentials is not None else ""
    if not given:
        raise ApiError(401, "authorization", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    user = state.users.identify(given)
    if user is None:
        raise ApiError(401, "authorization", "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
    return user


AuthDep = Depends(current_user)
UserDep = Annotated[User, Depends(current_user)]


def require_writer(user: User) -> None:
    if not user.can_write():
        raise ApiError(403, "role", f"{user.name} is a viewer: viewers read only; changes need the member or "
                       "admin role")


def require_manager(user: User, owner: str, what: str) -> None:
    """403 unless ``user`` may change ``what`` (an experiment), which ``owner`` submitted."""
    require_writer(user)
    if not user.manages(owner):
        raise ApiError(403, "owner", f"{what} belongs to {owner}: members change their own experiments only")


def require_admin(user: User) -> None:
    if user.role != Role.ADMIN:
        raise ApiError(403, "role", f"{user.name} is a {user.role}: only admins read this")
