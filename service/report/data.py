"""A report's trials, read from MLflow: a sweep's run is a parent whose trials are its child runs
(tag ``mlflow.parentRunId``); any other run is its own single trial.

The reads are few and bulk: one ``get_run`` per parent, one paged ``search_runs`` per parent for
its children (MLflow's filter grammar has no ``IN`` or ``OR`` on tags, so several parents cannot
share one search; an Orchestra experiment has one run, so that is one search per experiment), and
the metric histories over a thread pool, one ``get_metric_history`` per trial and metric (the
public API, exact; the server's bulk endpoint samples long histories).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
PAGE = 1000  # runs per search_runs page: one reply stays a few MB even with a full spec per run
THREADS = 8  # concurrent reads: enough to hide the round trips, few enough for one MLflow worker
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # MLflow's ids; anything else would break the filter string
T = TypeVar("T")
R = TypeVar("R")


class ReportError(ValueError):
    """A request the report cannot answer: ``field`` names the input at fault (the API's 422 or
    409 body names it too)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.status = field, status


class TrackingUnavailable(RuntimeError):
    """MLflow did not answer (or answered an error that is not about the request)."""


@dataclass(frozen=True)
class Trial:
    """One trained configuration: its params (the resolved spec flattened, ``sweep.<path>`` for a
    sweep's sampled values), MLflow's latest value of each metric, and the histories loaded."""

    run_id: str
    name: str
    params: dict[str, str]
    latest: dict[str, float]
    parent_id: str | None = None  # the sweep's run; None for a run that is its own trial
    status: str = "FINISHED"
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value)

    def final(self, metric: str) -> float:
        """The last logged value (by step), or MLflow's latest when no history was loaded."""
        points = self.history.get(metric)
        if points:
            return points[-1][1]
        return self.latest.get(metric, math.nan)

    def best(self, metric: str, mode: str) -> float:
        """The lowest (``min``) or highest (``max``) finite value logged; NaN when none."""
        values = [v for _, v in self.history.get(metric, ()) if math.isfinite(v)]
        if not values:
            return math.nan
        return min(values) if mode == "min" else max(values)


def _pool_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="report") as pool:
        return list(pool.map(fn, items))


def _trial(run: Any, parent_id: str | None) -> Trial:
    return Trial(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                 params=dict(run.data.params), latest=dict(run.data.metrics), parent_id=parent_id,
                 status=run.info.status)


def _children(client: MlflowClient, parent: Any) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([parent.info.experiment_id], max_results=PAGE, page_token=token,
                                  filter_string=f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_trials(client: MlflowClient, parent_run_ids: Sequence[str]) -> list[Trial]:
    """The trials of these runs (each sweep's children, else the run), without histories; a run
    named twice counts once. Raises :class:`ReportError` for an id that is not an MLflow run."""
    wanted = list(dict.fromkeys(parent_run_ids))
    for run_id in wanted:
        if not _RUN_ID.fullmatch(run_id):
            raise ReportError("experiment_id", f"not an MLflow run id: {run_id[:80]!r}")
    parents = _pool_map(client.get_run, wanted)
    children = _pool_map(lambda p: _children(client, p), parents)
    trials: dict[str, Trial] = {}
    for parent, kids in zip(parents, children, strict=True):
        for run in kids or [parent]:
            trials.setdefault(run.info.run_id, _trial(run, parent.info.run_id if kids else None))
    return list(trials.values())


def _history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` by step; a step logged twice (a retried attempt) keeps its latest value."""
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    by_step = {int(m.step): float(m.value) for m in points}
    return list(by_step.items())


def load_histories(client: MlflowClient, trials: Sequence[Trial], metrics: Sequence[str]) -> list[Trial]:
    """The trials with the histories of ``metrics`` (those each trial logged) loaded."""
    jobs = [(t.run_id, m) for t in trials for m in metrics if m in t.latest]
    results = _pool_map(lambda job: _history(client, *job), jobs)
    loaded: dict[str, dict[str, list[tuple[int, float]]]] = {t.run_id: {} for t in trials}
    for (run_id, metric), points in zip(jobs, results, strict=True):
        loaded[run_id][metric] = points
    return [replace(t, history=loaded[t.run_id]) for t in trials]
