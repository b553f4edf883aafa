"""FastAPI dependencies: the app's state, a DB session per request, bearer-token auth."""

import hmac
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session, sessionmaker

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


def get_state(request: Request) -> AppState:
    return request.app.state.orchestra  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(get_state)]

# Ids are 32 hex characters (uuid4().hex). Anything else names nothing: a 404 before the database
# sees it (a NUL byte in a query is an error on PostgreSQL).
_ID = re.compile(r"[0-9a-f]{32}")


def known_shape(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise HTTPException(404, f"no {kind} {value[:64]!r}")
    return value


def _experiment_id(experiment_id: Annotated[str, Path()]) -> str:
    return known_shape("experiment", experiment_id)


def _run_id(run_id: Annotated[str, Path()]) -> str:
    return known_shape("run", run_id)


ExperimentId = Annotated[str, Depends(_experiment_id)]
RunId = Annotated[str, Depends(_run_id)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_token(request: Request, state: StateDep) -> None:
    tokens = state.settings.tokens
    if not tokens:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    # Compare against every token in constant time; never log the value.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not ok:
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


AuthDep = Depends(require_token)
