"""The OpenAPI document: the experiment spec's JSON schema as the submission body (JSON and YAML),
every error status with the one error body the API answers, and the bearer scheme.

FastAPI cannot see the spec in the body (the route reads raw bytes, to take YAML and to bound the
document before parsing it), so the schema is put into the document here, from the same pydantic
model that validates submissions.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.schemas import ErrorBody
from service.spec import ExperimentSpec

_REF = "#/components/schemas/{model}"

_WHY = {
    400: "the body or a query parameter is not readable (not JSON/YAML, too deep, an unknown cursor)",
    401: "no valid bearer token (when ORCHESTRA_API_TOKENS or ORCHESTRA_USERS_FILE is set)",
    403: "the caller's role or ownership does not allow it (the rule is named)",
    404: "no such experiment or run",
    409: "the Idempotency-Key was used with a different spec; deleting an unfinished experiment; resuming "
         "a run that has not failed or been cancelled",
    413: "the body, or the spec once YAML's aliases are expanded, is over the limit",
    422: "the spec or a parameter is invalid: every problem with its field",
    503: "a dependency (the database, Ray) does not answer; see Retry-After",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for these status codes, each with the API's error body."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


def spec_request_body() -> dict[str, Any]:
    spec = {"$ref": _REF.format(model="ExperimentSpec")}
    return {"required": True, "content": {
        "application/json": {"schema": spec},
        "application/yaml": {"schema": {"type": "string", "description": "the same spec as YAML"}},
    }}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        spec = ExperimentSpec.model_json_schema(ref_template=_REF)
        schemas.update(spec.pop("$defs", {}))
        schemas["ExperimentSpec"] = spec
        # FastAPI declares its own 422 body (HTTPValidationError); ours is the ErrorBody
        error_ref = {"$ref": _REF.format(model="ErrorBody")}
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                unprocessable = operation.get("responses", {}).get("422")
                if unprocessable is not None:
                    unprocessable["content"] = {"application/json": {"schema": error_ref}}
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
