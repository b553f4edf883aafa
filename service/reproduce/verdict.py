"""A claim's verdict from the trials' metrics: paired differences, their confidence interval, and
the rule that turns the comparisons into holds / does not hold / inconclusive.

For each cell (the values of ``claim.within``) and each baseline, the method's trials are paired
with the baseline's by ``claim.pair_by`` (the seed), and the differences d = method - baseline
(baseline - method where lower is better) give a mean, a standard error and n. The comparison is
*better* when the 95% interval of the mean difference (Student's t with n - 1 degrees of freedom)
lies above zero and the mean passes ``claim.tolerance``, *worse* when it lies below zero and the
mean passes minus the tolerance, else a *tie*. With one pair there is no interval, so every
comparison is a tie. Without ``pair_by`` the two groups are compared unpaired (Welch's standard
error, the smaller n's degrees of freedom).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Literal

from service.reproduce.manifest import Claim

Outcome = Literal["better", "worse", "tie", "missing"]
Verdict = Literal["holds", "does not hold", "inconclusive"]

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; beyond 30 the normal's.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    if df >= 30:
        return 1.96 if df > 120 else _T975[30]
    return _T975[max(k for k in _T975 if k <= df)]  # the next smaller df: a wider interval


@dataclass(frozen=True)
class TrialValues:
    """What a claim reads of one trial: its spec's values and its metrics' final, best and mean
    (over the logged steps) values."""

    params: dict[str, str]
    final: dict[str, float]
    best: dict[str, float]
    mean: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    cell: dict[str, str]
    method: dict[str, str]
    baseline: dict[str, str]
    n: int
    mean: float  # of the differences, in the claim's favour when positive
    half_width: float  # of the 95% interval (inf when n < 2)
    outcome: Outcome


@dataclass
class ClaimResult:
    claim: Claim
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: Verdict = "inconclusive"
    reason: str = ""


def _selects(trial: TrialValues, values: dict[str, str]) -> bool:
    return all(_same(trial.params.get(k), v) for k, v in values.items())


def _same(logged: str | None, wanted: str) -> bool:
    if logged is None:  # a section left out (no gradient code) logs no param: "None" selects it
        return wanted == "None"
    if logged == wanted:
        return True
    try:  # "1" and "1.0" are the same number
        return float(logged) == float(wanted)
    except ValueError:
        return False


def _value(trial: TrialValues, claim: Claim) -> float | None:
    """The claim's metric of the trial; ``a - b`` is the difference of two metrics (a gap)."""
    values = {"final": trial.final, "best": trial.best, "mean": trial.mean}[claim.stat]
    names = claim.metric.split(" - ")
    found = [values.get(name) for name in names]
    if any(v is None or not math.isfinite(v) for v in found):
        return None
    first, *rest = (float(v) for v in found if v is not None)
    return first - sum(rest)


def _compare(method: list[TrialValues], baseline: list[TrialValues], claim: Claim) -> tuple[int, float, float]:
    sign = 1.0 if claim.higher_is_better else -1.0
    if claim.pair_by:
        def key(t: TrialValues) -> tuple[str | None, ...]:
            return tuple(t.params.get(p) for p in claim.pair_by)

        base = {key(t): _value(t, claim) for t in baseline}
        diffs = [sign * (v - w) for t in method
                 if (v := _value(t, claim)) is not None and (w := base.get(key(t))) is not None]
        if not diffs:
            return 0, math.nan, math.inf
        if len(diffs) < 2:
            return 1, diffs[0], math.inf
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        return len(diffs), statistics.fmean(diffs), t975(len(diffs) - 1) * se
    a = [v for t in method if (v := _value(t, claim)) is not None]
    b = [v for t in baseline if (v := _value(t, claim)) is not None]
    if not a or not b:
        return 0, math.nan, math.inf
    mean = sign * (statistics.fmean(a) - statistics.fmean(b))
    n = min(len(a), len(b))
    if n < 2:
        return n, mean, math.inf
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return n, mean, t975(n - 1) * se


def judge(claim: Claim, trials: list[TrialValues]) -> ClaimResult:
    result = ClaimResult(claim)
    trials = [t for t in trials
              if all(any(_same(t.params.get(k), v) for v in allowed) for k, allowed in claim.where.items())]
    chosen = [t for t in trials if any(_selects(t, m) for m in claim.methods())]
    cells = sorted({tuple(t.params.get(p, "") for p in claim.within) for t in chosen}) or [()]
    for cell_values in cells:
        cell = dict(zip(claim.within, cell_values, strict=True))
        in_cell = [t for t in trials if _selects(t, cell)]
        for selected in claim.methods():
            method = [t for t in in_cell if _selects(t, selected)]
            for baseline in claim.baselines:
                n, mean, half = _compare(method, [t for t in in_cell if _selects(t, baseline)], claim)
                outcome: Outcome
                if n == 0:
                    outcome = "missing"
                elif mean - half > 0 and mean > claim.tolerance:
                    outcome = "better"
                elif mean + half < 0 and mean < -claim.tolerance:
                    outcome = "worse"
                else:
                    outcome = "tie"
                result.comparisons.append(Comparison(cell, selected, baseline, n, mean, half, outcome))
    outcomes = [c.outcome for c in result.comparisons]
    counts = {o: outcomes.count(o) for o in ("better", "tie", "worse", "missing")}
    tally = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if counts["missing"]:
        result.verdict, result.reason = "inconclusive", f"some comparisons have no trials ({tally})"
    elif any(c.n < 2 for c in result.comparisons):
        result.verdict, result.reason = "inconclusive", f"fewer than two pairs in some comparisons ({tally})"
    elif counts["worse"]:
        result.verdict, result.reason = "does not hold", f"the method is worse in some comparisons ({tally})"
    elif claim.expect == "no_worse" or counts["tie"] == 0:
        result.verdict, result.reason = "holds", f"{tally}"
    else:
        result.verdict, result.reason = "inconclusive", f"no comparison lost, but not every one won ({tally})"
    return result
