"""``orchestra reproduce NAME``: submit a reproduction's stages through the API, wait for them, and
write the report of its last stage with each claim, the measured outcome and the verdict."""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.client import TERMINAL, Client
from service.reproduce.manifest import Claim, Manifest, load, render
from service.reproduce.verdict import ClaimResult, TrialValues, judge

EXAMPLES = Path("examples") / "reproduce"
WAIT_LIMIT_S = {True: 3600.0, False: 48 * 3600.0}  # quick, full: a bound, not an estimate


def find(name: str) -> Path:
    """A reproduction's folder: a path, or a name under ``examples/reproduce`` of this folder or of
    the source checkout Orchestra runs from."""
    candidates = [Path(name), Path.cwd() / EXAMPLES / name, Path(__file__).resolve().parents[2] / EXAMPLES / name]
    for folder in candidates:
        if (folder / "reproduction.yaml").is_file():
            return folder
    known = sorted(p.parent.name for p in (Path(__file__).resolve().parents[2] / EXAMPLES).glob("*/reproduction.yaml"))
    raise ValueError(f"no reproduction {name!r} (known: {', '.join(known) or 'none'})")


@dataclass
class Outcome:
    manifest: Manifest
    experiments: list[dict[str, Any]]  # the last stage's, as the API returns them
    results: list[ClaimResult]
    report: Path
    seconds: float


def run_stages(manifest: Manifest, folder: Path, client: Client, *, quick: bool,
               wait: Callable[[Client, list[str]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Submit each stage's experiments, wait for them; the last stage's experiments, finished."""
    run_ids: dict[str, str] = {}
    finished: list[dict[str, Any]] = []
    for stage in manifest.stages(quick):
        submitted = []
        for entry in stage.experiments:
            exp = client.submit(render(folder, entry, run_ids))
            if entry.key:
                run_ids[entry.key] = exp["runs"][0]["id"]
            submitted.append(exp["id"])
        finished = wait(client, submitted)
        failed = [e for e in finished if e["status"] != "succeeded"]
        if failed:
            errors = "; ".join(f"{e['name']}: {e['status']} {(r.get('error') or '')[:300]}"
                               for e in failed for r in e["runs"])
            raise RuntimeError(f"stage {stage.name!r}: {len(failed)} experiment(s) did not succeed: {errors}")
    return finished


def wait_for(client: Client, ids: list[str], *, timeout_s: float, poll_s: float = 2.0,
             progress: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        exps = [client.experiment(i) for i in ids]
        if progress is not None:
            progress(exps)
        if all(e["status"] in TERMINAL for e in exps):
            return exps
        if time.monotonic() > deadline:
            raise TimeoutError(f"experiments {ids} not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)


def trial_values(mlflow_uri: str, experiments: list[dict[str, Any]], claims: list[Claim]) -> list[TrialValues]:
    """Every trial of the experiments (a sweep's child runs, else the run itself): its params, its
    metrics' final values and, for the claims that ask, their best and mean over the history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    parents = [r["mlflow_run_id"] for e in experiments for r in e["runs"] if r.get("mlflow_run_id")]
    runs: list[Any] = []
    for parent in parents:
        exp_id = client.get_run(parent).info.experiment_id
        children: list[Any] = []
        token = None
        while True:  # bounded by the number of trials: pages of up to 1000
            page = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                      max_results=1000, page_token=token)
            children += list(page)
            token = page.token
            if not token:
                break
        runs += children or [client.get_run(parent)]
    wanted = {(name, c.higher_is_better) for c in claims if c.stat != "final" for name in c.metric.split(" - ")}

    def history(run: Any) -> tuple[dict[str, float], dict[str, float]]:
        best, mean = {}, {}
        for metric, higher in wanted:
            values = [m.value for m in client.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
            if values:
                best[metric] = max(values) if higher else min(values)
                mean[metric] = sum(values) / len(values)
        return best, mean

    with ThreadPoolExecutor(8) as pool:
        extra = list(pool.map(history, runs))
    return [TrialValues(params=dict(run.data.params), final=dict(run.data.metrics), best=b, mean=m)
            for run, (b, m) in zip(runs, extra, strict=True)]


def claims_html(manifest: Manifest, results: list[ClaimResult], *, quick: bool) -> str:
    """The claims section: each statement, the verdict, and the comparisons it rests on."""
    esc = html.escape
    colour = {"holds": "#1a7f37", "does not hold": "#cf222e", "inconclusive": "#9a6700"}
    parts = [f"<p><b>{esc(manifest.title)}</b>. {esc(manifest.paper)}</p>",
             f"<p>Version: {'quick' if quick else 'full'} ({esc(manifest.needs['quick' if quick else 'full'])}).</p>"]
    if manifest.notes:
        parts.append(f"<p>{esc(manifest.notes)}</p>")
    parts.append("<p>Statistics: per comparison, the mean paired difference (in the claim's favour when "
                 "positive) over the pairs (n) and the half-width of its 95% interval (Student's t, n - 1 "
                 "degrees of freedom); better / worse when the interval excludes zero and the mean passes "
                 "the claim's tolerance, else a tie.</p>")
    for i, res in enumerate(results, 1):
        c = res.claim
        parts.append(f"<h3>Claim {i}: <span style='color:{colour[res.verdict]}'>{esc(res.verdict)}</span></h3>")
        parts.append(f"<p>{esc(c.statement)}</p><p><i>Measured:</i> {esc(c.stat)} {esc(c.metric)} "
                     f"({'higher' if c.higher_is_better else 'lower'} is better), expected "
                     f"{esc(c.expect.replace('_', ' '))}, tolerance {c.tolerance:g}; {esc(res.reason)}.</p>")
        rows = ["<tr><th>cell</th><th>method</th><th>baseline</th><th>n</th><th>mean difference</th>"
                "<th>95% half-width</th><th>outcome</th></tr>"]
        for cmp in res.comparisons:
            cell = ", ".join(f"{_short(k)}={v}" for k, v in cmp.cell.items()) or "all"
            base = ", ".join(f"{v}" for v in cmp.baseline.values())
            method = ", ".join(f"{v}" for v in cmp.method.values())
            half = "-" if math.isinf(cmp.half_width) else f"{cmp.half_width:.4f}"
            mean = "-" if math.isnan(cmp.mean) else f"{cmp.mean:+.4f}"
            rows.append(f"<tr><td>{esc(cell)}</td><td>{esc(method)}</td><td>{esc(base)}</td><td>{cmp.n}</td>"
                        f"<td>{mean}</td><td>{half}</td><td>{esc(cmp.outcome)}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(parts)


def _short(path: str) -> str:
    """``faults.byzantine.attack.name`` -> ``attack``: the last part that is not ``name``."""
    parts = path.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def judge_all(manifest: Manifest, trials: list[TrialValues]) -> list[ClaimResult]:
    return [judge(claim, trials) for claim in manifest.claims]


def load_manifest(name: str) -> tuple[Manifest, Path]:
    folder = find(name)
    return load(folder), folder
