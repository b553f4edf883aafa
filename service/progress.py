"""A run's live progress, read from MLflow: the step reached of ``train.max_steps``, steps per
second, the latest training loss and evaluation metric, the time left; for a sweep, its trials.

Rank 0 logs ``train/loss`` every log period and ``eval/*`` every evaluation period, each with its
step, so MLflow alone says how far a run is: the latest metric values (``get_run``) give the step,
and the timestamps of the recent ``train/loss`` points give the rate. A sweep's trials are child
runs of its MLflow run (tag ``mlflow.parentRunId``), all read with one search.

Reading progress never raises and never waits long: MLflow's client retries a down server for
minutes, so the server is pinged first (within a second, as the scheduler does) and the reads run
under a deadline; either failing gives ``progress: null`` with the reason.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from service.domain import Run
from service.state import ACTIVE
from service.tracking import Tracker

TIMEOUT_S = 5.0  # every MLflow read of one request together
MAX_IN_FLIGHT = 8  # reads that may be waiting on a stalled server at once; more wait for a slot
RATE_POINTS = 10  # the recent train/loss points that give the rate (the last ten log periods)
LOSS = "train/loss"
PARENT_TAG = "mlflow.parentRunId"
_DONE_TRIAL = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}

T = TypeVar("T")


class Trials(BaseModel):
    """A sweep's trials (its MLflow child runs) by state; those not started yet are the rest of
    ``total``."""

    total: int = Field(description="sweep.num_samples times the number of values of every grid parameter")
    finished: int
    failed: int = Field(description="failed or killed")
    running: int

    @property
    def done(self) -> int:
        return self.finished + self.failed


class Progress(BaseModel):
    step: int = Field(description="the latest step logged (0 before the first); a sweep's: its trials' steps "
                      "added up, a finished or failed trial counting all of its steps")
    max_steps: int | None = Field(description="train.max_steps (a sweep's: of all its trials); null without "
                                  "a train section")
    fraction: float | None = Field(description="step / max_steps, from 0 to 1")
    steps_per_s: float | None = Field(description="over the recent train/loss points (a sweep's: steps of all "
                                      "trials since it started); null until known or once the run is over")
    eta_s: float | None = Field(description="seconds left at that rate")
    loss: float | None = Field(description="the latest train/loss (null for a sweep: see its trials' runs)")
    eval_metric: str | None = Field(description="the evaluation metric shown: a sweep's metric, else the first "
                                    "eval/* other than eval/loss, else eval/loss")
    eval_value: float | None = Field(description="its latest value (a sweep's: the best trial's so far)")
    evals: dict[str, float] = Field(description="every latest eval/* value (not for a sweep)")
    updated_at: datetime | None = Field(description="when the latest of these values was logged")
    trials: Trials | None = Field(description="a sweep's trials; null for a plain run")


class RunProgress(BaseModel):
    run_id: str
    status: str
    mlflow_run_id: str | None
    progress: Progress | None = Field(description="null when MLflow could not be read")
    reason: str | None = Field(description="why progress is null")


@dataclass(frozen=True)
class Plan:
    """What the resolved spec says about progress: how many steps, how many trials, which metric."""

    max_steps: int | None
    trials: int | None  # None: not a sweep
    metric: str | None  # a sweep's metric
    mode: str  # a sweep's "min" or "max"

    @classmethod
    def of(cls, resolved: dict[str, Any]) -> Plan:
        train = resolved.get("train") or {}
        sweep = resolved.get("sweep")
        max_steps = train.get("max_steps")
        if not sweep:
            return cls(max_steps=max_steps, trials=None, metric=None, mode="min")
        # Ray Tune runs num_samples times the grid (the product of every grid parameter's values);
        # the other distributions draw once per sample.
        trials = int(sweep.get("num_samples", 1))
        for dist in (sweep.get("parameters") or {}).values():
            if "grid" in dist:
                trials *= len(dist["grid"])
        return cls(max_steps=max_steps, trials=trials, metric=sweep.get("metric", "eval/loss"),
                   mode=sweep.get("mode", "min"))


def experiment_progress(tracker: Tracker, resolved: dict[str, Any], runs: Sequence[Run], *,
                        timeout_s: float = TIMEOUT_S) -> list[RunProgress]:
    """Each run's progress. A run without an MLflow run yet (queued) is at step 0; when MLflow
    does not answer (or not within ``timeout_s``), progress is null with the reason."""
    plan = Plan.of(resolved)
    read = [r for r in runs if r.mlflow_run_id]
    found: dict[str, Progress | str] = {}
    if read:
        try:
            tracker.ping()
        except Exception as exc:
            found = {r.id: f"MLflow does not answer at {tracker.uri} ({type(exc).__name__})" for r in read}
        else:
            try:
                found = _within(lambda: {r.id: _read_one(tracker, plan, r) for r in read}, timeout_s)
            except TimeoutError:
                found = {r.id: f"MLflow did not answer within {timeout_s:g} s" for r in read}
    out = []
    for run in runs:
        value = found.get(run.id, _zero(plan))
        progress, reason = (None, value) if isinstance(value, str) else (value, None)
        out.append(RunProgress(run_id=run.id, status=run.status, mlflow_run_id=run.mlflow_run_id, progress=progress,
                               reason=reason))
    return out


def _read_one(tracker: Tracker, plan: Plan, run: Run) -> Progress | str:
    """One run's progress, or why it could not be read (one run's failure leaves the others)."""
    assert run.mlflow_run_id is not None
    try:
        if plan.trials is not None:
            return _sweep(tracker.client, plan, run.mlflow_run_id, active=run.status in ACTIVE)
        return _single(tracker.client, plan, run.mlflow_run_id, active=run.status in ACTIVE)
    except Exception as exc:
        return f"MLflow: {type(exc).__name__}: {str(exc)[:200]}"


def _zero(plan: Plan) -> Progress:
    """A run that has logged nothing yet (a sweep: no trial started)."""
    trials = Trials(total=plan.trials, finished=0, failed=0, running=0) if plan.trials is not None else None
    max_steps = plan.max_steps * (plan.trials or 1) if plan.max_steps is not None else None
    return Progress(step=0, max_steps=max_steps, fraction=_fraction(0, max_steps), steps_per_s=None, eta_s=None,
                    loss=None, eval_metric=None, eval_value=None, evals={}, updated_at=None, trials=trials)


def _single(client: Any, plan: Plan, mlflow_run_id: str, *, active: bool) -> Progress:
    latest = {m.key: m for m in client.get_run(mlflow_run_id).data._metric_objs}
    step = max((int(m.step) for m in latest.values()), default=0)
    evals = {k: v for k, m in sorted(latest.items()) if k.startswith("eval/") and (v := _finite(m.value)) is not None}
    shown = _headline(evals)
    # A finished run's rate would cost a history read for nothing: nothing is left to estimate.
    rate = _rate([(int(m.step), int(m.timestamp)) for m in client.get_metric_history(mlflow_run_id, LOSS)]) \
        if active and LOSS in latest else None
    loss = latest.get(LOSS)
    return Progress(
        step=step, max_steps=plan.max_steps, fraction=_fraction(step, plan.max_steps), steps_per_s=rate,
        eta_s=_eta(step, plan.max_steps, rate), loss=_finite(loss.value) if loss is not None else None,
        eval_metric=shown, eval_value=evals.get(shown) if shown else None, evals=evals,
        updated_at=_when(m.timestamp for m in latest.values()), trials=None)


def _sweep(client: Any, plan: Plan, mlflow_run_id: str, *, active: bool) -> Progress:
    parent = client.get_run(mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], max_results=50_000,
                                  filter_string=f"tags.{PARENT_TAG} = '{mlflow_run_id}'")
    counts = {"finished": 0, "failed": 0, "running": 0}
    step = planned = 0
    best: float | None = None
    stamps: list[int] = []
    for child in children:
        # A trial that sweeps train.max_steps logs its own value as the parameter sweep.train.max_steps.
        swept = child.data.params.get("sweep.train.max_steps")
        trial_steps = int(float(swept)) if swept is not None else plan.max_steps or 0
        latest = {m.key: m for m in child.data._metric_objs}
        stamps += [int(m.timestamp) for m in latest.values()]
        state = _DONE_TRIAL.get(child.info.status, "running")
        counts[state] += 1
        reached = max((int(m.step) for m in latest.values()), default=0)
        step += trial_steps if state != "running" else min(reached, trial_steps)  # stopped early counts as done
        planned += trial_steps
        value = _finite(latest[plan.metric].value) if plan.metric in latest else None
        if value is not None and (best is None or (value < best if plan.mode == "min" else value > best)):
            best = value
    total = max(plan.trials or 0, len(children))
    max_steps = planned + (total - len(children)) * plan.max_steps if plan.max_steps is not None else None
    rate = None
    if active and step > 0 and parent.info.start_time:
        elapsed = time.time() - parent.info.start_time / 1000
        rate = step / elapsed if elapsed > 0 else None
    return Progress(
        step=step, max_steps=max_steps, fraction=_fraction(step, max_steps), steps_per_s=rate,
        eta_s=_eta(step, max_steps, rate), loss=None, eval_metric=plan.metric, eval_value=best, evals={},
        updated_at=_when(stamps), trials=Trials(total=total, **counts))


def _rate(points: Iterable[tuple[int, int]]) -> float | None:
    """Steps per second over the last ``RATE_POINTS`` of (step, timestamp in ms) points, taken
    only back to where the steps stop rising: a retried attempt logs its steps again from its
    checkpoint, and the previous attempt's points say nothing about the current pace."""
    ordered = sorted(points, key=lambda p: (p[1], p[0]))
    tail = ordered[-1:]
    for point in reversed(ordered[:-1]):
        if len(tail) >= RATE_POINTS or point[0] >= tail[0][0]:
            break
        tail.insert(0, point)
    if len(tail) < 2:
        return None
    steps, ms = tail[-1][0] - tail[0][0], tail[-1][1] - tail[0][1]
    return steps * 1000 / ms if ms > 0 else None


def _headline(evals: dict[str, float]) -> str | None:
    """The evaluation metric worth one column: eval/loss says little beside train/loss, so the
    first other one (accuracy, perplexity, ...) when there is one."""
    others = [k for k in evals if k != "eval/loss"]
    return others[0] if others else ("eval/loss" if "eval/loss" in evals else None)


def _fraction(step: int, max_steps: int | None) -> float | None:
    return min(1.0, step / max_steps) if max_steps else None


def _eta(step: int, max_steps: int | None, rate: float | None) -> float | None:
    if not max_steps or not rate:
        return None
    return max(0, max_steps - step) / rate


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity (a diverged loss): such a value is shown as unknown."""
    value = float(value)
    return value if math.isfinite(value) else None


def _when(stamps_ms: Iterable[int]) -> datetime | None:
    latest = max(stamps_ms, default=None)
    return datetime.fromtimestamp(latest / 1000, tz=UTC) if latest is not None else None


_SLOTS = threading.BoundedSemaphore(MAX_IN_FLIGHT)


def _within(read: Callable[[], T], timeout_s: float) -> T:
    """``read()`` on a daemon thread, given up after ``timeout_s`` (TimeoutError). A server that
    answers its health check and then stalls would hold the caller for MLflow's retries (minutes);
    the thread left behind ends with them, and at most ``MAX_IN_FLIGHT`` such threads exist."""
    deadline = time.monotonic() + timeout_s
    if not _SLOTS.acquire(timeout=timeout_s):
        raise TimeoutError
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = read()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            _SLOTS.release()

    thread = threading.Thread(target=target, name="orchestra-progress", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
