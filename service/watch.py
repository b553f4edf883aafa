"""Watching experiments from a terminal: one progress bar per run, redrawn in place (rich), or a
plain line per change when the output is not a terminal; what ``submit --wait`` and ``status
--watch`` show, from ``GET /v1/experiments/{id}/progress``."""

from __future__ import annotations

import time
from typing import Any

import typer

from service.client import TERMINAL, ApiError, Client

POLL_S = 1.0
API_GRACE_S = 60.0  # a watch outlives an API restart or a database blip of up to this long


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_text(run: dict[str, Any]) -> str:
    """A run's progress in words: a sweep's trials, steps, rate, loss, evaluation metric, ETA."""
    p = run.get("progress")
    if p is None:
        return f"progress unknown: {run.get('reason') or 'no answer'}"
    parts = []
    trials = p.get("trials")
    if trials:
        parts.append(f"trials {trials['finished'] + trials['failed']}/{trials['total']}"
                     + (f" ({trials['failed']} failed)" if trials["failed"] else ""))
    parts.append(f"{p['step']}/{p['max_steps']} steps" if p.get("max_steps") else f"step {p['step']}")
    if p.get("steps_per_s"):
        parts.append(f"{p['steps_per_s']:.3g} steps/s")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4g}")
    if p.get("eval_value") is not None:
        parts.append(f"{'best ' if trials else ''}{p['eval_metric']} {p['eval_value']:.4g}")
    if p.get("eta_s") is not None and run["status"] not in TERMINAL:
        parts.append(f"ETA {duration(p['eta_s'])}")
    return "  ".join(parts)


class Bars:
    """A terminal: one bar per run, redrawn in place at each poll."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskID, TextColumn

        # markup off: a reason from MLflow may hold brackets
        self.view = Progress(TextColumn("run {task.fields[run]}  {task.fields[status]:<10}", markup=False),
                             BarColumn(bar_width=24), TextColumn("{task.fields[detail]}", markup=False),
                             console=Console(), auto_refresh=False)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Bars:
        self.view.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.view.stop()

    def show(self, body: dict[str, Any]) -> None:
        for run in body["runs"]:
            p = run.get("progress") or {}
            fields = {"run": run["run_id"][:8], "status": run["status"], "detail": progress_text(run)}
            # no max_steps (a merge, a command): rich pulses the bar instead of filling it
            total, done = p.get("max_steps"), p.get("step", 0)
            if run["run_id"] not in self.tasks:
                self.tasks[run["run_id"]] = self.view.add_task("", total=total, completed=done, **fields)
            else:
                self.view.update(self.tasks[run["run_id"]], total=total, completed=done, **fields)
        self.view.refresh()


class Lines:
    """Not a terminal (a log, a pipe): a line per run whenever its status or step changes."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.seen: dict[str, tuple[Any, ...]] = {}

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, body: dict[str, Any]) -> None:
        for run in body["runs"]:
            p = run.get("progress") or {}
            key = (run["status"], p.get("step"), (p.get("trials") or {}).get("finished"),
                   (p.get("trials") or {}).get("failed"), run.get("reason"))
            if self.seen.get(run["run_id"]) != key:
                self.seen[run["run_id"]] = key
                typer.echo(f"[{time.monotonic() - self.start:6.1f}s] run {run['run_id'][:8]} {run['status']}  "
                           f"{progress_text(run)}")


def poll_progress(client: Client, experiment_id: str, failing_since: float | None) -> dict[str, Any] | None:
    """The progress, or None while the API is briefly away (it restarts, its database blinks)."""
    import httpx

    try:
        return client.progress(experiment_id)
    except (httpx.TransportError, ApiError) as exc:
        if isinstance(exc, ApiError) and exc.status != 503:
            raise
        if failing_since is not None and time.monotonic() - failing_since > API_GRACE_S:
            raise
        return None
