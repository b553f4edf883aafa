"""Turn a request body (JSON or YAML) into a validated ``ExperimentSpec`` or a ``SpecError``.

Errors name the field by its path in the user's document (``optimizer.lr``), not pydantic's
internal location (which inserts the union tag: ``optimizer.adamw.lr``).
"""

import copy
import re
from typing import Any

from pydantic import ValidationError

from service.spec.document import load_document
from service.spec.errors import SpecError
from service.spec.model import ExperimentSpec

__all__ = ["SpecError", "load_document", "parse_spec", "spec_errors", "validate_document"]

MAX_ERRORS = 50  # an error body stays small whatever the spec
_NAMED = re.compile(r"^([a-z_]+(?:\.[A-Za-z0-9_]+)+): (.+)$", re.S)


def _user_path(raw: Any, loc: tuple[Any, ...]) -> str:
    """Drop the discriminator tags pydantic adds to ``loc`` when they are not keys of the document."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(node, dict) and item not in node and isinstance(item, str):
            tag = next((node.get(k) for k in ("name", "method", "scheme", "kind") if k in node), None)
            if tag == item or item.startswith("function-") or item in ("model-before", "model-after"):
                continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else (
            node[item] if isinstance(node, list) and isinstance(item, int) and item < len(node) else None
        )
    return ".".join(parts) or "spec"


def spec_errors(exc: ValidationError, raw: Any) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False)[:MAX_ERRORS]:
        message = err["msg"].removeprefix("Value error, ")
        where = _user_path(raw, tuple(err["loc"]))
        # Cross-section rules raise "field.path: reason"; name that field rather than the section.
        named = _NAMED.match(message)
        if named:
            inner = named.group(1)
            where = inner if where == "spec" else (inner if inner.startswith(where + ".") else where)
            message = named.group(2)
        given = err.get("input")
        if isinstance(given, str | int | float | bool) and err["type"] != "missing" and str(given) not in message:
            message += f" (got {repr(given)[:200]})"
        out.append({"field": where, "message": message[:2000]})
    return out


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = doc
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise KeyError(path)
    node[keys[-1]] = value


def _path_exists(resolved: dict[str, Any], path: str) -> bool:
    node: Any = resolved
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


# ``distributed`` paths a sweep may range over: what the workers compute, not what they claim from
# the cluster (the sweep's trials all hold the same resources)
SWEEPABLE_DISTRIBUTED = ("distributed.aggregator", "distributed.gradient_coding", "distributed.exchange")


def _sweepable(path: str) -> bool:
    head = path.split(".")[0]
    if head == "distributed":
        return path.startswith(SWEEPABLE_DISTRIBUTED)
    return head not in ("sweep", "name")


def _check_sweep(spec: ExperimentSpec, raw: dict[str, Any]) -> None:
    if spec.sweep is None:
        return
    resolved = spec.resolved()
    errors = []
    for path in spec.sweep.parameters:
        where = f"sweep.parameters.{path}"
        if not _sweepable(path) or not _path_exists(resolved, path):
            errors.append({"field": where, "message": f"{path!r} is not a parameter of this spec"})
            continue
        for value in spec.sweep.candidate_values(path):
            trial = copy.deepcopy(raw)
            trial.pop("sweep", None)
            _set_path(trial, path, value)
            try:
                ExperimentSpec.model_validate(trial)
            except ValidationError as exc:
                first = spec_errors(exc, trial)[0]
                errors.append({"field": where, "message": f"value {value!r} gives an invalid spec: "
                               f"{first['field']}: {first['message']}"})
                break
    if errors:
        raise SpecError(errors)


def validate_document(raw: dict[str, Any]) -> ExperimentSpec:
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(spec_errors(exc, raw)) from None
    _check_sweep(spec, raw)
    return spec


def parse_spec(body: bytes | str, content_type: str = "application/json") -> ExperimentSpec:
    return validate_document(load_document(body, content_type))
