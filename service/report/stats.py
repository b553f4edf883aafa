"""Groups of trials and their statistics over seeds.

A group-by path names a spec value: a leaf (``optimizer.name``: the param of that name, or the
sweep's ``sweep.<path>`` for a trial that logged no spec, such as a command's) or a block
(``distributed.aggregator``: every param under that prefix, so that a sweep over whole method
blocks groups by method and its settings). Trials with equal values at every path form a group;
whatever else differs inside a group (the seed, by default) is what the statistics aggregate over.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.report.data import ReportError, Trial

Mode = Literal["min", "max"]
Band = Literal["std", "minmax"]
SEED = "train.seed"
MISSING = "None"  # a path a trial does not have (the reproduce manifests match it by this text too)
_HEX_ID = re.compile(r"\b[0-9a-f]{32}\b")  # Orchestra's and MLflow's run ids
# Params that say nothing about the method: names, scheduling, bookkeeping, the user's code hash.
_NOT_SPEC = ("name", "description", "priority", "project")
_NOT_SPEC_PREFIXES = ("tags.", "code.", "retry.", "checkpoints.", "sweep.", "mlflow.", "orchestra.")


def mode_of(metric: str, modes: dict[str, Mode] | None = None) -> Mode:
    """Which value is best: ``modes`` when it names the metric, else the lowest of a loss and the
    highest of anything else."""
    if modes and metric in modes:
        return modes[metric]
    return "min" if "loss" in metric.lower() else "max"


def short(path: str) -> str:
    """``faults.byzantine.attack.name`` -> ``attack``: the last part that is not ``name``."""
    parts = path.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def is_seed(param: str) -> bool:
    last = param.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


def block(trial: Trial, path: str) -> dict[str, str]:
    """The params under ``path.``, keyed by the rest of their name."""
    prefix = path + "."
    return {k[len(prefix):]: v for k, v in trial.params.items() if k.startswith(prefix)}


def leaf(trial: Trial, path: str) -> str | None:
    value = trial.params.get(path)
    return value if value is not None else trial.params.get(f"sweep.{path}")


def default_group_by(trials: Sequence[Trial]) -> list[str]:
    """The paths the sweeps ranged over (their trials' ``sweep.<path>`` params), but the seed:
    seeds are what the report aggregates over."""
    paths = {k[len("sweep."):] for t in trials if t.parent_id for k in t.params if k.startswith("sweep.")}
    return sorted(paths - {SEED})


def check_paths(trials: Sequence[Trial], paths: Sequence[str]) -> None:
    """Refuse a path no trial has, naming near misses."""
    known = {k.removeprefix("sweep.") for t in trials for k in t.params}
    blocks = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for path in paths:
        if path not in known and path not in blocks:
            near = difflib.get_close_matches(path, sorted(known | blocks), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ReportError("group_by", f"no trial has a param or block {path!r}{hint}")


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (n - 1) of the finite values; ``n`` counts them and
    ``left_out`` the trials without a finite value (a metric not logged, or a diverged run)."""

    mean: float
    std: float
    n: int
    left_out: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        all_values = list(values)
        finite = np.array([v for v in all_values if math.isfinite(v)], dtype=float)
        n = len(finite)
        mean = float(finite.mean()) if n else math.nan
        std = float(finite.std(ddof=1)) if n > 1 else math.nan
        return cls(mean, std, n, len(all_values) - n)


@dataclass(frozen=True)
class Curve:
    """A group's curve of one metric: at each step logged by any of its trials, the mean over the
    trials that logged a finite value there and the band (mean +- sample std, or min to max)."""

    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: np.ndarray  # trials behind each point

    @classmethod
    def of(cls, histories: Sequence[Sequence[tuple[int, float]]], band: Band) -> Curve:
        steps = np.unique(np.array([s for h in histories for s, _ in h], dtype=np.int64))
        grid = np.full((len(histories), len(steps)), np.nan)
        for row, points in enumerate(histories):
            if points:
                at = np.searchsorted(steps, np.fromiter((s for s, _ in points), np.int64, len(points)))
                grid[row, at] = np.fromiter((v for _, v in points), float, len(points))
        grid[~np.isfinite(grid)] = np.nan  # a diverged value would flatten every other curve
        count = np.sum(~np.isnan(grid), axis=0)
        keep = count > 0
        grid, steps, count = grid[:, keep], steps[keep], count[keep]
        if not steps.size:
            empty = np.array([], dtype=float)
            return cls(steps, empty, empty, empty, count)
        mean = np.nanmean(grid, axis=0)
        if band == "minmax":
            low, high = np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)
        else:
            centred = np.where(np.isnan(grid), 0.0, grid - mean)
            std = np.sqrt(np.sum(centred**2, axis=0) / np.maximum(count - 1, 1))
            std[count < 2] = 0.0  # one trial: no spread to show
            low, high = mean - std, mean + std
        return cls(steps, mean, low, high, count)


@dataclass
class Group:
    """Trials with the same values at the group-by paths. ``final[metric]`` and ``best[metric]``
    hold one value per trial, in the order of ``trials`` (NaN where a trial has none), for a
    caller's own statistics (paired by seed: ``trials[i].params``)."""

    key: tuple[str, ...]
    label: str
    trials: list[Trial]
    final: dict[str, list[float]]
    best: dict[str, list[float]]

    def summary(self, metric: str, which: Literal["final", "best"] = "final") -> Summary:
        return Summary.of((self.final if which == "final" else self.best)[metric])


def _part(trial: Trial, path: str, is_block: bool) -> str:
    if not is_block:
        value = leaf(trial, path)
        return MISSING if value is None else value
    items = block(trial, path)
    if not items and leaf(trial, path) is not None:  # no spec logged: the sampled block as text
        return str(leaf(trial, path))
    return "\x1f".join(f"{k}={v}" for k, v in sorted(items.items())) or MISSING


def _block_labels(keys: list[str]) -> dict[str, str]:
    """Compact labels of one block's values: its ``name``, and the settings that tell apart the
    groups of the same name (``flag f=2``, ``flag f=3``, but ``krum``): the spec differences
    section lists every setting."""
    parsed = [dict(item.split("=", 1) for item in key.split("\x1f") if "=" in item) for key in keys]
    by_name: dict[str | None, list[dict[str, str]]] = {}
    for items in parsed:
        by_name.setdefault(items.get("name"), []).append(items)
    labels = {}
    for key, items in zip(keys, parsed, strict=True):
        if not items:  # no key=value items: missing, or a sampled block logged as text
            labels[key] = key
            continue
        peers = by_name[items.get("name")]
        varying = sorted(k for k in set().union(*peers) if k != "name" and len({p.get(k) for p in peers}) > 1)
        words = [items["name"]] if "name" in items else []
        words += [f"{k}={items[k]}" for k in varying if k in items]
        labels[key] = " ".join(words) or "(same)"
    return labels


def _atom(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order, before text: lr 0.001 < 0.01 < 0.1, f=2 < f=10."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _order(key: tuple[str, ...], blocks: Sequence[bool]) -> tuple[tuple[int, float, str], ...]:
    """A group's place: by each path's value; a block by its name, then its settings."""
    atoms = []
    for part, is_block in zip(key, blocks, strict=True):
        items = dict(i.split("=", 1) for i in part.split("\x1f") if "=" in i) if is_block else {}
        if items:
            atoms += [_atom(items.get("name", ""))] + [_atom(v) for k, v in sorted(items.items()) if k != "name"]
        else:
            atoms.append(_atom(part))
    return tuple(atoms)


def group_trials(trials: Sequence[Trial], paths: Sequence[str]) -> list[tuple[tuple[str, ...], str, list[Trial]]]:
    """``(key, label, trials)`` per group, in the order of their values."""
    blocks = [not any(path in t.params for t in trials) and any(block(t, path) for t in trials) for path in paths]
    by_key: dict[tuple[str, ...], list[Trial]] = {}
    for trial in trials:
        key = tuple(_part(trial, p, b) for p, b in zip(paths, blocks, strict=True))
        by_key.setdefault(key, []).append(trial)
    part_labels = [_block_labels(sorted({k[i] for k in by_key})) if b else {} for i, b in enumerate(blocks)]
    out = []
    for key in sorted(by_key, key=lambda k: _order(k, blocks)):
        parts = [part_labels[i].get(v, v) for i, v in enumerate(key)]
        label = parts[0] if len(parts) == 1 else ", ".join(f"{short(p)}={v}" for p, v in zip(paths, parts, strict=True))
        out.append((key, label or "all", by_key[key]))
    return out


def spec_params(trial: Trial) -> dict[str, str]:
    """The trial's spec params; a sampled value (``sweep.<path>``) stands in for its path only
    where the trial logged no spec there (a command's trial logs none)."""
    out = {k: v for k, v in trial.params.items() if not k.startswith("sweep.")}
    for key, value in trial.params.items():
        path = key[len("sweep."):]
        if key.startswith("sweep.") and path not in out and not block(trial, path):
            out[path] = value
    return out


def comparable(param: str, value: str | None = None) -> bool:
    """Whether a param belongs in the list of spec differences (not a seed, a name, a run id or
    tracking bookkeeping)."""
    if param in _NOT_SPEC or param.startswith(_NOT_SPEC_PREFIXES) or is_seed(param):
        return False
    return value is None or not _HEX_ID.search(value)


def differences(groups: Sequence[Group]) -> dict[str, list[str]]:
    """The params whose value differs between groups: one value per group (its trials' distinct
    values joined with " | " when they differ inside the group)."""
    specs = [[spec_params(t) for t in g.trials] for g in groups]
    params = sorted({k for g in specs for p in g for k in p if comparable(k)})
    out: dict[str, list[str]] = {}
    for param in params:
        per_group = [" | ".join(sorted({p.get(param, MISSING) for p in g})) for g in specs]
        if len(set(per_group)) > 1 and all(comparable(param, v) for v in per_group):
            out[param] = per_group
    return out


def pooled(groups: Sequence[Group]) -> dict[str, list[str]]:
    """The params that vary inside at least one group (what the statistics aggregate over, seeds
    included), with all their values."""
    specs = [[spec_params(t) for t in g.trials] for g in groups]
    params = sorted({k for g in specs for p in g for k in p if comparable(k) or is_seed(k)})
    out: dict[str, list[str]] = {}
    for param in params:
        if any(len({p.get(param, MISSING) for p in g}) > 1 for g in specs):
            values = {p.get(param, MISSING) for g in specs for p in g}
            if not all(comparable(param, v) or is_seed(param) for v in values):
                continue
            out[param] = sorted(values, key=_atom)
    return out
