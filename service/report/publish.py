"""A report from MLflow to a page: read the runs' trials, build, render, and keep the page as the
artifact ``report/report.html`` of the first run (a sweep's parent run), next to what it reports on.
The API and the CLI's callers (``orchestra reproduce``) both come through here."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.report.build import build_report, check_names, choose_metrics
from service.report.data import ReportError, TrackingUnavailable, find_trials, load_histories
from service.report.page import render_html
from service.report.stats import Band, Mode

if TYPE_CHECKING:
    from service.domain import Experiment

ARTIFACT = "report/report.html"
log = logging.getLogger(__name__)
# Drawing is CPU-bound and holds the GIL: one report drawn at a time keeps the API's other requests
# answering while several reports are asked for at once (reading MLflow still overlaps).
_DRAWING = threading.Lock()


def mlflow_run_ids(experiments: Sequence[Experiment | Mapping[str, Any]]) -> list[str]:
    """The MLflow runs of the experiments' runs, in order: domain objects or the API's JSON."""
    ids: list[str] = []
    for exp in experiments:
        if isinstance(exp, Mapping):
            ids += [r["mlflow_run_id"] for r in exp.get("runs", []) if r.get("mlflow_run_id")]
        else:
            ids += [r.mlflow_run_id for r in exp.runs if r.mlflow_run_id]
    return ids


def report_html(tracking_uri: str, run_ids: Sequence[str], *, title: str, metrics: Sequence[str] | None = None,
                group_by: Sequence[str] | None = None, band: Band = "std", modes: dict[str, Mode] | None = None,
                sections: Sequence[tuple[str, str]] = (), subtitle: str = "", log_artifact: bool = True) -> str:
    """The page of the trials of these MLflow runs; logged on the first run unless ``log_artifact``
    is off. Raises :class:`ReportError` for a request it cannot answer and
    :class:`TrackingUnavailable` when MLflow does not answer."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_names(metrics, group_by)
    if not run_ids:
        raise ReportError("experiment_id", "no MLflow run yet: the experiment has not been dispatched", 409)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        trials = find_trials(client, run_ids)
        chosen = choose_metrics(trials, metrics)
        trials = load_histories(client, trials, chosen)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ReportError("experiment_id", f"MLflow does not know a run of the experiment: {exc.message[:300]}",
                              409) from None
        raise TrackingUnavailable(f"MLflow: {exc.message[:300]}") from exc
    except OSError as exc:  # requests' connection errors are OSErrors too
        raise TrackingUnavailable(f"MLflow: {type(exc).__name__}: {str(exc)[:300]}") from exc
    report = build_report(trials, chosen, group_by, band=band, modes=modes)
    with _DRAWING:
        page = render_html(report, title=title, sections=sections, subtitle=subtitle)
    if log_artifact:
        try:
            client.log_text(run_ids[0], page, ARTIFACT)
        except Exception as exc:  # the page is made; keeping a copy in MLflow is secondary
            log.warning("report: could not log %s on run %s: %s: %s", ARTIFACT, run_ids[0], type(exc).__name__,
                        str(exc)[:300])
    return page


def publish_report(mlflow_uri: str, experiments: Sequence[Experiment | Mapping[str, Any]], *, out: Path,
                   metrics: Sequence[str] | None = None, group_by: Sequence[str] | None = None,
                   title: str | None = None, sections: Sequence[tuple[str, str]] = (), band: Band = "std",
                   modes: dict[str, Mode] | None = None) -> Path:
    """Write the report of ``experiments`` (domain objects or the API's JSON) to ``out``, log it on
    the first experiment's MLflow run, and return ``out``."""
    names = [e["name"] if isinstance(e, Mapping) else e.name for e in experiments]
    page = report_html(mlflow_uri, mlflow_run_ids(experiments), metrics=metrics, group_by=group_by, band=band,
                       modes=modes, sections=sections, title=title or f"Report: {', '.join(names)}",
                       subtitle=", ".join(names))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
