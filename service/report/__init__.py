"""Comparison reports: groups of runs over seeds, as one self-contained HTML page.

    trials = load_histories(client, find_trials(client, mlflow_run_ids), metrics)   # data
    report = build_report(trials, metrics, group_by=["optimizer"])                   # build, stats
    page = render_html(report, title="...", sections=[("Claims", fragment)])         # page, plots

``publish.report_html`` does the three from MLflow run ids (and keeps the page as an artifact).
Nothing here imports matplotlib until a page is drawn.
"""

from service.report.build import Report, build_report, default_metrics
from service.report.data import ReportError, TrackingUnavailable, Trial, find_trials, load_histories
from service.report.page import render_html
from service.report.stats import Group, Summary

__all__ = ["Group", "Report", "ReportError", "Summary", "TrackingUnavailable", "Trial", "build_report",
           "default_metrics", "find_trials", "load_histories", "render_html"]
