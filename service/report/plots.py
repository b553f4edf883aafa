"""One PNG per metric: the groups' curves over steps (the mean over seeds with a band) beside each
trial's final value per group.

matplotlib is imported here, when a report is drawn, not when the API starts; figures are built
with its object API on the Agg canvas (no pyplot: no global figure state shared between the API's
threads) and with its bundled DejaVu fonts, so a page never asks the network for anything.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from service.report.build import Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DPI = 96
RGBA = tuple[float, float, float, float]
# Beyond a few groups a legend hides the curves; the right panel's labels, in the same colours, say
# which curve is which.
LEGEND_MAX = 4


def colours(n: int) -> list[RGBA]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def metric_png(report: Report, metric: str) -> bytes:
    """The figure of ``metric`` as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(report.groups)
    fig = Figure(figsize=(10.0, max(3.4, 1.2 + 0.26 * n)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    curves_ax, finals_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    palette = colours(n)
    _curves(curves_ax, report, metric, palette)
    _finals(finals_ax, report, metric, palette)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _curves(ax: Axes, report: Report, metric: str, palette: list[RGBA]) -> None:
    drawn = 0
    for group, colour in zip(report.groups, palette, strict=True):
        curve = report.curves[metric][group.label]
        if not curve.steps.size:
            continue
        drawn += 1
        marker = "o" if curve.steps.size < 3 else None  # one evaluation at the end: a point, not a line
        ax.plot(curve.steps, curve.mean, color=colour, linewidth=1.4, marker=marker, markersize=3,
                label=group.label)
        if (curve.count > 1).any():
            ax.fill_between(curve.steps, curve.low, curve.high, color=colour, alpha=0.18, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    floor = _log_floor(report, metric)
    if floor is not None:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)  # a band reaching towards zero would otherwise stretch the axis by decades
    if 0 < drawn <= LEGEND_MAX:
        ax.legend(fontsize="small", frameon=False)


def _log_floor(report: Report, metric: str) -> float | None:
    """The bottom of a log axis for a loss whose means span more than two decades (all > 0), a
    fifth of the lowest mean; None for a linear axis."""
    if "loss" not in metric.lower():
        return None
    curves = [c for c in report.curves[metric].values() if c.steps.size]
    if not curves:
        return None
    low, high = min(float(c.mean.min()) for c in curves), max(float(c.mean.max()) for c in curves)
    return low / 5 if low > 0 and high / low > 100 else None


def _finals(ax: Axes, report: Report, metric: str, palette: list[RGBA]) -> None:
    """Each trial's final value as a dot on its group's row, the mean as a bar."""
    rows = list(range(len(report.groups)))[::-1]  # the first group on top, as in the tables
    for row, group, colour in zip(rows, report.groups, palette, strict=True):
        values = [v for v in group.final[metric] if math.isfinite(v)]
        if not values:
            continue
        ax.scatter(values, [row] * len(values), s=14, color=colour, alpha=0.8, linewidths=0)
        mean = sum(values) / len(values)
        ax.plot([mean, mean], [row - 0.3, row + 0.3], color=colour, linewidth=2)
    ax.set_yticks(rows, [g.label for g in report.groups], fontsize="small")
    for tick, colour in zip(ax.get_yticklabels(), palette, strict=True):
        tick.set_color(colour)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"final {metric}")
    ax.grid(True, axis="x", alpha=0.3)
