"""The report as data: groups, their per-trial values, curves and summaries, the spec differences.
Rendering (``plots``, ``page``) only reads it, and a caller may run its own statistics on it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.report.data import ReportError, Trial
from service.report.stats import (
    Band,
    Curve,
    Group,
    Mode,
    Summary,
    check_paths,
    default_group_by,
    differences,
    group_trials,
    mode_of,
    pooled,
)

TRAIN_LOSS = "train/loss"
# MLflow's own rule for metric names (letters, digits, _ - . space / :), at most 250 characters
METRIC_NAME = re.compile(r"[A-Za-z0-9_\-. /:]{1,250}")
PATH_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


@dataclass
class Report:
    """``groups`` in order; for each metric a curve per group (by the group's label)."""

    trials: list[Trial]
    metrics: list[str]
    group_by: list[str]
    modes: dict[str, Mode]
    band: Band
    groups: list[Group]
    curves: dict[str, dict[str, Curve]]
    differences: dict[str, list[str]]  # param -> its value in each group, in the order of groups
    pooled: dict[str, list[str]]  # params that vary inside a group -> their values
    notes: list[str] = field(default_factory=list)

    def values(self, metric: str, which: str = "final") -> dict[str, list[float]]:
        """Each group's per-trial values of ``metric`` (``final`` or ``best``), by label."""
        return {g.label: list((g.final if which == "final" else g.best)[metric]) for g in self.groups}

    def summaries(self, metric: str, which: str = "final") -> dict[str, Summary]:
        return {g.label: Summary.of(v) for g, v in zip(self.groups, self.values(metric, which).values(), strict=True)}


def default_metrics(trials: Sequence[Trial]) -> list[str]:
    """``train/loss`` and every ``eval/`` metric that some trial logged."""
    logged = {m for t in trials for m in t.latest}
    return ([TRAIN_LOSS] if TRAIN_LOSS in logged else []) + sorted(m for m in logged if m.startswith("eval/"))


def check_names(metrics: Sequence[str] | None, group_by: Sequence[str] | None) -> None:
    """Refuse malformed names before anything is read (the API's 422)."""
    for metric in metrics or ():
        if not METRIC_NAME.fullmatch(metric):
            raise ReportError("metric", f"not a metric name: {metric[:80]!r}")
    for path in group_by or ():
        if not PATH_NAME.fullmatch(path):
            raise ReportError("group_by", f"not a spec path (a.b.c): {path[:80]!r}")


def choose_metrics(trials: Sequence[Trial], metrics: Sequence[str] | None) -> list[str]:
    """The metrics asked for (each must be logged by some trial), or the defaults."""
    if not trials:
        raise ReportError("experiment_id", "no trials: the runs logged nothing to MLflow yet", 409)
    if not metrics:
        chosen = default_metrics(trials)
        if not chosen:
            logged = sorted({m for t in trials for m in t.latest})
            raise ReportError("metric", "no train/loss or eval/ metric logged; name one "
                              f"({', '.join(logged[:20]) or 'none logged'})")
        return chosen
    known = {m for t in trials for m in t.latest}
    for metric in metrics:
        if metric not in known:
            raise ReportError("metric", f"no trial logged {metric!r} (logged: {', '.join(sorted(known)[:20])})")
    return list(dict.fromkeys(metrics))


def build_report(trials: Sequence[Trial], metrics: Sequence[str], group_by: Sequence[str] | None = None, *,
                 band: Band = "std", modes: dict[str, Mode] | None = None) -> Report:
    """Group the trials (by ``group_by``, else by what their sweeps ranged over but the seed) and
    compute, per metric and group, each trial's final and best value and the curve over seeds.
    ``trials`` carry the histories of ``metrics`` (``data.load_histories``)."""
    check_names(metrics, group_by)
    paths = list(dict.fromkeys(group_by)) if group_by else default_group_by(trials)
    check_paths(trials, paths)
    chosen_modes = {m: mode_of(m, modes) for m in metrics}
    groups = [Group(key=key, label=label, trials=members,
                    final={m: [t.final(m) for t in members] for m in metrics},
                    best={m: [t.best(m, chosen_modes[m]) for t in members] for m in metrics})
              for key, label, members in group_trials(trials, paths)]
    _unique_labels(groups)
    curves = {m: {g.label: Curve.of([t.history.get(m, []) for t in g.trials], band) for g in groups}
              for m in metrics}
    notes = []
    if not paths:
        notes.append("No group-by path given and no sweep ranged over anything but the seed: all trials are "
                     "one group.")
    without = {m: sum(1 for t in trials if not t.history.get(m)) for m in metrics}
    notes += [f"{n} of {len(trials)} trials logged no {m}." for m, n in without.items() if n]
    unfinished = sorted({t.status for t in trials} - {"FINISHED"})
    if unfinished:
        count = sum(1 for t in trials if t.status != "FINISHED")
        notes.append(f"{count} trials are not FINISHED ({', '.join(unfinished)}): what they logged is included.")
    return Report(trials=list(trials), metrics=list(metrics), group_by=paths, modes=chosen_modes, band=band,
                  groups=groups, curves=curves, differences=differences(groups), pooled=pooled(groups), notes=notes)


def _unique_labels(groups: list[Group]) -> None:
    """Compact labels may coincide (two blocks that differ only in a setting left out): fall back
    to the full key for those."""
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
    for g in groups:
        if seen[g.label] > 1:
            g.label = " / ".join(part.replace("\x1f", " ") for part in g.key)
