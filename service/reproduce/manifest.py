"""A reproduction: ``examples/reproduce/<name>/reproduction.yaml``, the paper's claims and the
experiments that test them.

The manifest names spec files of its folder in stages (each stage's experiments are submitted
together; a stage starts once the one before it has ended). A spec file is a template: ``${name}``
is replaced by the entry's ``values`` and by the Orchestra run id of every earlier entry that has
a ``key`` (so a merge can name the models an earlier stage trained). ``quick`` is a smaller
version for a 2-core CPU machine, ``full`` the version the claims are stated for; ``needs`` says
what each takes.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from algorithms._config import StrictModel

MANIFEST = "reproduction.yaml"


class Entry(StrictModel):
    """One experiment to submit: a spec file of the folder and the values its template takes."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.ya?ml$")
    key: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                            description="later templates get this experiment's run id as ${key}")
    values: dict[str, str | int | float | bool] = Field(default_factory=dict)


class Stage(StrictModel):
    name: str
    experiments: list[Entry] = Field(min_length=1)


class Claim(StrictModel):
    """One comparison the paper states: ``method`` (or each of several) against each of ``baselines``
    on ``metric``.

    Trials are selected by their spec's values (``{path: value}``, as MLflow's params hold them),
    compared inside each cell of ``within`` (for example one attack and one f), paired by
    ``pair_by`` (for example the seed). ``expect: better`` holds when the method wins every
    comparison, ``no_worse`` when it loses none; a comparison is won or lost when the mean paired
    difference passes ``tolerance`` and twice its standard error (see ``verdict``)."""

    statement: str
    metric: str = Field(description="a metric, or 'a - b': the difference of two (a generalisation gap)")
    stat: Literal["final", "best", "mean"] = Field(
        default="final", description="the last logged value, the best one, or the mean over the logged steps")
    higher_is_better: bool = True
    where: dict[str, list[str]] = Field(default_factory=dict,
                                        description="only trials whose value at each path is one of these")
    method: dict[str, str] | list[dict[str, str]] = Field(
        description="the method's trials, or several methods each compared with every baseline")
    baselines: list[dict[str, str]] = Field(min_length=1)
    within: list[str] = Field(default_factory=list)
    pair_by: list[str] = Field(default_factory=list)
    expect: Literal["better", "no_worse"] = "better"
    tolerance: float = Field(default=0.0, ge=0.0)

    @field_validator("method", "baselines", "where", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:  # MLflow params are text: 1.0 in YAML is "1.0" there
        if isinstance(value, dict):
            return {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in value.items()}
        if isinstance(value, list):
            return [{k: str(v) for k, v in b.items()} if isinstance(b, dict) else b for b in value]
        return value

    def methods(self) -> list[dict[str, str]]:
        return self.method if isinstance(self.method, list) else [self.method]


class ReportSpec(StrictModel):
    metrics: list[str] = Field(min_length=1)
    group_by: list[str] = Field(default_factory=list)


class Manifest(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    title: str
    paper: str
    needs: dict[Literal["quick", "full"], str]
    quick: list[Stage] = Field(min_length=1)
    full: list[Stage] = Field(min_length=1)
    report: ReportSpec
    claims: list[Claim] = Field(min_length=1)
    notes: str = ""

    @model_validator(mode="after")
    def _keys_unique(self) -> Manifest:
        for mode in ("quick", "full"):
            keys = [e.key for s in getattr(self, mode) for e in s.experiments if e.key]
            if len(keys) != len(set(keys)):
                raise ValueError(f"{mode}: experiment keys must be unique")
        return self

    def stages(self, quick: bool) -> list[Stage]:
        return self.quick if quick else self.full


def load(folder: Path) -> Manifest:
    doc = yaml.safe_load((folder / MANIFEST).read_text())
    return Manifest.model_validate(doc)


def render(folder: Path, entry: Entry, run_ids: dict[str, str]) -> dict[str, Any]:
    """The entry's spec: its template with its values and the earlier runs' ids filled in."""
    text = (folder / entry.file).read_text()
    try:  # a value may itself name an earlier run: ${a0}
        values = {k: string.Template(str(v)).substitute(run_ids) for k, v in entry.values.items()}
        filled = string.Template(text).substitute({**run_ids, **values})
    except KeyError as exc:
        raise ValueError(f"{entry.file}: ${{{exc.args[0]}}} has no value (give it in values, or as an "
                         "earlier experiment's key)") from None
    doc = yaml.safe_load(filled)
    if not isinstance(doc, dict):
        raise ValueError(f"{entry.file}: not a spec (a YAML mapping)")
    return doc
