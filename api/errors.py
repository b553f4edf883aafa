"""Errors as ``{"detail": [{"field", "message"}]}``, and the request-body size limit (413).

A database that does not answer (stopped, restarting, unreachable, its pool exhausted) is a 503
with ``Retry-After``, never a 500 with a traceback: the request changed nothing, and the client
may send it again (a submission with its ``Idempotency-Key``).
"""

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.spec.parse import SpecError


def _body(errors: list[dict[str, str]]) -> dict[str, Any]:
    return {"detail": errors}


class ApiError(HTTPException):
    """An error answered as ``{"detail": [{"field": field, "message": message}]}``, like every
    other error of the API (one body shape, the one the OpenAPI document declares)."""

    def __init__(self, status_code: int, field: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, message, headers)
        self.field = field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SpecError)
    async def _spec_error(_: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(_body(exc.errors), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = getattr(exc, "field", "request")  # routing's own 404 / 405: the request itself
        return JSONResponse(_body([{"field": field, "message": str(exc.detail)}]), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        return JSONResponse(_body(errors), status_code=422)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if not _unavailable(exc):
            raise exc  # a real fault of ours: the server's 500
        return _database_unavailable()

    @app.exception_handler(DisconnectionError)
    async def _database_gone(_: Request, exc: DisconnectionError) -> JSONResponse:
        return _database_unavailable()

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_: Request, exc: PoolTimeout) -> JSONResponse:
        return _database_unavailable()

    @app.exception_handler(UnicodeDecodeError)
    async def _not_utf8(_: Request, exc: UnicodeDecodeError) -> JSONResponse:
        return JSONResponse(_body([{"field": "body", "message": f"not UTF-8: {exc.reason}"}]), 400)


RETRY_AFTER_S = 5


def _unavailable(exc: DBAPIError) -> bool:
    """The database could not be reached or dropped the connection (not a bad statement)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


def _database_unavailable() -> JSONResponse:
    body = _body([{"field": "database", "message": "the database is unavailable; retry later"}])
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length or while streaming; paths in
    ``larger`` (an exact path: code bundles) have their own limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_max = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limited = _Limited(self.app, self.larger.get(scope.get("path", ""), self.default_max))
        await limited(scope, receive, send)


class _Limited:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        too_big = False

        async def counted() -> Message:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = JSONResponse(
            _body([{"field": "body", "message": f"request body over {self.max_bytes} bytes"}]), 413
        )
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body.body)).encode())]})
        await send({"type": "http.response.body", "body": body.body})


class _TooLarge(Exception):
    pass
