"""The report as one self-contained HTML page: the plots as PNG data URIs, the style inline, no
script and nothing fetched from elsewhere, so the file can be mailed, archived as an MLflow
artifact, or opened offline (the API serves it with a policy that forbids anything else)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from service.report.build import Report
from service.report.stats import SEED, Summary

# Served with the page by the API: images from data URIs and the inline style only.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
.meta { color: #59636e; } figure { margin: 0.5em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #59636e; font-size: 0.92em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.93em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-size: 0.92em; }
"""

DOT, ELLIPSIS = " \u00b7 ", " \u2026"
_BAND = {"std": "the band is the mean \u00b1 one sample standard deviation (n \u2212 1) over the trials",
         "minmax": "the band spans the lowest to the highest value over the trials"}


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def number(x: float) -> str:
    return "\u2013" if not math.isfinite(x) else f"{x:.4g}"


def mean_std(s: Summary) -> str:
    if s.n == 0:
        return "\u2013"
    return number(s.mean) if s.n == 1 else f"{number(s.mean)} \u00b1 {number(s.std)}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()) -> str:
    """A table of already escaped cells; ``numeric`` right-aligns those columns."""
    out = ["<div class='scroll'><table><thead><tr>", *(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = (f"<td class='num'>{c}</td>" if i < len(numeric) and numeric[i] else f"<td>{c}</td>"
                 for i, c in enumerate(row))
        out += ["<tr>", *cells, "</tr>"]
    out.append("</tbody></table></div>")
    return "".join(out)


def _overview(report: Report) -> str:
    parents = list(dict.fromkeys(t.parent_id or t.run_id for t in report.trials))
    by = ", ".join(f"<code>{esc(p)}</code>" for p in report.group_by) or "nothing (one group)"
    rows = []
    for g in report.groups:
        statuses = {s: sum(1 for t in g.trials if t.status == s) for s in sorted({t.status for t in g.trials})}
        rows.append([esc(g.label), str(len(g.trials)), esc(", ".join(f"{n} {s}" for s, n in statuses.items()))])
    aggregated = "".join(f"<li><code>{esc(p)}</code>: {esc(', '.join(v))}</li>" for p, v in report.pooled.items())
    seeds = "" if SEED in report.pooled else " (no seed varies inside a group)"
    return (f"<p>{len(report.trials)} trials of {len(parents)} MLflow run(s) "
            f"({', '.join(f'<code>{esc(p)}</code>' for p in parents[:10])}{ELLIPSIS if len(parents) > 10 else ''})"
            f", grouped by {by}.</p>"
            + _table(["group", "trials", "status"], rows, [False, True, False])
            + f"<p>Inside each group, the statistics aggregate over{esc(seeds)}:</p>"
            + (f"<ul>{aggregated}</ul>" if aggregated else "<p>nothing: every group has one configuration.</p>"))


def _metric(report: Report, metric: str, png: bytes) -> str:
    mode = report.modes[metric]
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    caption = (f"Left: the mean of <code>{esc(metric)}</code> over each group's trials at each step; "
               f"{_BAND[report.band]} (only where a group has two or more). Steps a trial did not log, and "
               "non-finite values, are left out of the mean there. Right: each trial's final value (dots) and "
               "the group's mean (bar); the labels' colours are the curves'.")
    rows = []
    for g in report.groups:
        final, best = g.summary(metric, "final"), g.summary(metric, "best")
        n = str(final.n) + (f" (of {final.n + final.left_out})" if final.left_out else "")
        rows.append([esc(g.label), n, mean_std(final), mean_std(best)])
    table = _table(["group", "n", "final (mean \u00b1 std)", f"best: {'lowest' if mode == 'min' else 'highest'} "
                    "(mean \u00b1 std)"], rows, [False, True, True, True])
    return (f"<h2>{esc(metric)}</h2><figure><img src='{uri}' alt='{esc(metric)} by group' "
            f"width='{_width(png)}'><figcaption>{caption}</figcaption></figure>{table}"
            "<p class='meta'>final: the last value logged (by step); best: over all logged values. "
            "Mean \u00b1 sample standard deviation over the trials with a finite value (n).</p>")


def _width(png: bytes) -> int:
    """The PNG's pixel width (its IHDR chunk), so the page lays out before the image decodes."""
    return int.from_bytes(png[16:20], "big")


def _differences(report: Report) -> str:
    if not report.differences:
        return "<p>No spec param differs between the groups (seeds, names, run ids and tracking params left out).</p>"
    params = list(report.differences)
    rows = [[esc(g.label), *(esc(report.differences[p][i]) for p in params)] for i, g in enumerate(report.groups)]
    return ("<p>The spec params whose values differ between groups (seeds, names, run ids and tracking params "
            "left out); \u201c|\u201d separates values that differ inside a group.</p>"
            + _table(["group", *(f"<code>{esc(p)}</code>" for p in params)], rows))


def render_html(report: Report, *, title: str, sections: Sequence[tuple[str, str]] = (), subtitle: str = "") -> str:
    """The page. ``sections`` are ``(heading, html_fragment)`` placed after the overview (a caller's
    claims and verdicts); the fragments are trusted HTML, the headings are escaped."""
    from service.report.plots import metric_png

    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p class='meta'>{esc(subtitle) + DOT if subtitle else ''}generated {generated} by Orchestra"
             f"{DOT}metrics: {esc(', '.join(report.metrics))}</p>",
             "<h2>Groups</h2>", _overview(report)]
    for heading, fragment in sections:
        parts += [f"<h2>{esc(heading)}</h2>", fragment]
    for metric in report.metrics:
        parts.append(_metric(report, metric, metric_png(report, metric)))
    parts += ["<h2>Spec differences between groups</h2>", _differences(report)]
    if report.notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{esc(n)}</li>" for n in report.notes), "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
