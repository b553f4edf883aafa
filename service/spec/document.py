"""Decode a request body (JSON or YAML) into a plain document, within bounds, before validation.

What is refused here, fast and before anything is built from the body:
- structure (400, field ``body``): not JSON/YAML, not a mapping, nesting deeper than
  ``MAX_DEPTH``, more than ``MAX_NODES`` values once YAML aliases are expanded (an alias bomb of a
  few hundred bytes expands to gigabytes), integers too long to parse;
- values (422, naming the path): numbers that are not finite (``NaN``, ``Infinity``, ``.inf``),
  integers outside 64 bits (what the database and every JSON reader downstream hold), and control
  characters in strings (PostgreSQL text cannot hold NUL; the others only hide things in names).

YAML is read twice: once as parser events (iterative, so depth and the expanded size are counted
without recursion and the read stops at the first bound crossed), then loaded.
"""

import json
import math
import re
from typing import Any

import yaml

from service.spec.errors import SpecError

MAX_DEPTH = 32
MAX_NODES = 100_000
INT64 = 2**63
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _structure(message: str) -> SpecError:
    return SpecError([{"field": "body", "message": message}], 400)


def _check_yaml_events(text: str) -> None:
    """Depth and expanded size of a YAML document from its events, anchors and aliases included."""
    sizes: list[int] = [0]  # nodes so far in each open collection (the first: the document)
    anchors_open: list[str | None] = []
    anchored: dict[str, int] = {}
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                sizes.append(1)
                anchors_open.append(event.anchor)
                if len(sizes) - 1 > MAX_DEPTH:
                    raise _structure(f"nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                size = sizes.pop()
                anchor = anchors_open.pop()
                if anchor is not None:
                    anchored[anchor] = size
                sizes[-1] += size
            elif isinstance(event, yaml.ScalarEvent):
                sizes[-1] += 1
                if event.anchor is not None:
                    anchored[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                sizes[-1] += anchored.get(event.anchor or "", 1)
            else:
                continue
            if sum(sizes) > MAX_NODES:
                raise _structure(f"more than {MAX_NODES} values once YAML aliases are expanded")
    except yaml.YAMLError as exc:
        raise _structure(f"not valid YAML: {str(exc)[:500]}") from None


def _check_values(doc: Any) -> None:
    """Depth, and the values no store or reader downstream can hold, named by their path."""
    errors: list[dict[str, str]] = []
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack and len(errors) < 20:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _structure(f"nested deeper than {MAX_DEPTH} levels")
        where = path or "spec"
        if isinstance(node, dict):
            for key, value in node.items():
                name = str(key)
                if _CONTROL.search(name):
                    errors.append({"field": where, "message": f"a key holds a control character: {name[:80]!r}"})
                stack.append((value, f"{path}.{name}" if path else name, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, f"{path}.{i}", depth + 1) for i, value in enumerate(node))
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int):
            if not -INT64 <= node < INT64:
                errors.append({"field": where, "message": "integer outside the 64-bit range"})
        elif isinstance(node, float):
            if not math.isfinite(node):
                errors.append({"field": where, "message": f"{node} is not a finite number"})
        elif isinstance(node, str):
            if _CONTROL.search(node):
                errors.append({"field": where, "message": "control characters are not allowed in strings"})
    if errors:
        raise SpecError(sorted(errors, key=lambda e: e["field"]), 422)


def load_document(body: bytes | str, content_type: str = "application/json") -> dict[str, Any]:
    """Decode JSON or YAML within the bounds above; anything but a mapping at the top is a 400."""
    text = body.decode("utf-8", errors="strict") if isinstance(body, bytes) else body
    is_yaml = "yaml" in content_type.lower()
    kind = "YAML" if is_yaml else "JSON"
    try:
        if is_yaml:
            _check_yaml_events(text)
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)  # NaN and Infinity load, and are refused by path below
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise _structure(f"not valid {kind}: {str(exc)[:500]}") from None
    except RecursionError:
        raise _structure(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise _structure(f"not valid {kind}: {str(exc)[:300]}") from None
    if not isinstance(data, dict):
        raise _structure("the spec must be a mapping at the top level")
    _check_values(data)
    return data
