"""``orchestra reproduce NAME``: submit a reproduction's stages through the API, wait for them, and
write the report of its last stage with each claim, the measured outcome and the verdict."""

from __future__ import annotations

import html
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.client import TERMINAL, Client
from service.report.stats import short
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

    from service.report.data import find_trials, load_histories
    from service.report.publish import mlflow_run_ids

    client = MlflowClient(tracking_uri=mlflow_uri)
    trials = find_trials(client, mlflow_run_ids(experiments))
    wanted = {name: c.higher_is_better for c in claims if c.stat != "final" for name in c.metric.split(" - ")}
    trials = load_histories(client, trials, sorted(wanted))
    out = []
    for t in trials:
        best = {m: t.best(m, "max" if higher else "min") for m, higher in wanted.items() if t.history.get(m)}
        mean = {m: statistics.fmean(v for _, v in t.history[m]) for m in wanted if t.history.get(m)}
        out.append(TrialValues(params=t.params, final=dict(t.latest), best=best, mean=mean))
    return out


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
            cell = ", ".join(f"{short(k)}={v}" for k, v in cmp.cell.items()) or "all"
            base = ", ".join(f"{v}" for v in cmp.baseline.values())
            method = ", ".join(f"{v}" for v in cmp.method.values())
            half = "-" if math.isinf(cmp.half_width) else f"{cmp.half_width:.4f}"
            mean = "-" if math.isnan(cmp.mean) else f"{cmp.mean:+.4f}"
            rows.append(f"<tr><td>{esc(cell)}</td><td>{esc(method)}</td><td>{esc(base)}</td><td>{cmp.n}</td>"
                        f"<td>{mean}</td><td>{half}</td><td>{esc(cmp.outcome)}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(parts)


def judge_all(manifest: Manifest, trials: list[TrialValues]) -> list[ClaimResult]:
    return [judge(claim, trials) for claim in manifest.claims]


def load_manifest(name: str) -> tuple[Manifest, Path]:
    folder = find(name)
    return load(folder), folder


def reproduce(name: str, client: Client, *, quick: bool, out: Path, echo: Callable[[str], None] = print,
              poll_s: float = 2.0) -> Outcome:
    """Run the reproduction ``name`` through the API at ``client``; write its report under ``out``."""
    manifest, folder = load_manifest(name)
    start = time.monotonic()
    echo(f"reproduce {manifest.name} ({'quick' if quick else 'full'}): {manifest.needs['quick' if quick else 'full']}")
    seen: dict[str, str] = {}

    def progress(exps: list[dict[str, Any]]) -> None:  # a line when an experiment's status changes
        for e in exps:
            if seen.get(e["id"]) != e["status"]:
                seen[e["id"]] = e["status"]
                echo(f"[{time.monotonic() - start:6.0f}s] {e['name']}: {e['status']}")

    def wait(c: Client, ids: list[str]) -> list[dict[str, Any]]:
        return wait_for(c, ids, timeout_s=WAIT_LIMIT_S[quick], poll_s=poll_s, progress=progress)

    experiments = run_stages(manifest, folder, client, quick=quick, wait=wait)
    mlflow_uri = client.info()["mlflow_tracking_uri"]
    trials = trial_values(mlflow_uri, experiments, manifest.claims)
    results = judge_all(manifest, trials)
    from service.report.publish import publish_report
    from service.report.stats import Mode

    out.mkdir(parents=True, exist_ok=True)
    modes: dict[str, Mode] = {m: "max" if c.higher_is_better else "min"  # "best" as the claims read it
                              for c in manifest.claims for m in c.metric.split(" - ")}
    path = publish_report(mlflow_uri, experiments, metrics=manifest.report.metrics, modes=modes,
                          group_by=manifest.report.group_by, title=f"Reproduction: {manifest.title}",
                          sections=[("Claims and verdicts", claims_html(manifest, results, quick=quick))],
                          out=out / f"reproduce-{manifest.name}{'-quick' if quick else ''}.html")
    for i, res in enumerate(results, 1):
        echo(f"claim {i}: {res.verdict} ({res.reason})")
    echo(f"report: {path}")
    return Outcome(manifest, experiments, results, path, time.monotonic() - start)
