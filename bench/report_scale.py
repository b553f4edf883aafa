"""How long a comparison report takes at scale: a local MLflow server (SQLite, as ``orchestra up``
starts it), one sweep's parent run with N child runs (the flattened resolved spec of a real
robust-aggregation sweep as params, ``sweep.<path>`` params, 2 metrics x 100 steps each, logged
with log_batch), then the report as the API makes it: trials read from MLflow, grouped, drawn,
rendered, and logged as an artifact on the parent run.

    python bench/report_scale.py                 # 200 trials
    python bench/report_scale.py --trials 500 --repeat 2
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import string
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.report.build import build_report, choose_metrics  # noqa: E402
from service.report.data import find_trials, load_histories  # noqa: E402
from service.report.page import render_html  # noqa: E402
from service.report.publish import report_html  # noqa: E402
from service.spec import ExperimentSpec  # noqa: E402
from service.stack import Stack, free_port  # noqa: E402
from workers.mlflow_log import flatten  # noqa: E402

AGGREGATORS: list[dict[str, Any]] = [{"name": "mean"}, {"name": "median"}, {"name": "trimmed_mean", "f": 3},
                                     {"name": "krum", "f": 3}, {"name": "flag", "f": 3}]
ATTACKS: list[dict[str, Any]] = [{"name": "uniform"}, {"name": "alie"}]


def base_spec() -> dict[str, Any]:
    """The flag reproduction's sweep template, filled in (100 steps), without its sweep section."""
    text = (ROOT / "examples" / "reproduce" / "flag" / "flag.yaml").read_text()
    doc = yaml.safe_load(string.Template(text).substitute(f=3, steps=100, seeds="[0]", attacks="[{name: uniform}]"))
    doc.pop("sweep")
    doc["train"]["eval_every"] = 1
    return doc  # type: ignore[no-any-return]


def trial_params(base: dict[str, Any], aggregator: dict[str, Any], attack: dict[str, Any], seed: int) -> dict[str, str]:
    doc = copy.deepcopy(base)
    doc["distributed"]["aggregator"] = aggregator
    doc["faults"]["byzantine"]["attack"] = attack
    doc["train"]["seed"] = seed
    params = flatten("", ExperimentSpec.model_validate(doc).resolved(), {})
    params.update({"sweep.distributed.aggregator": str(aggregator), "sweep.faults.byzantine.attack": str(attack),
                   "sweep.train.seed": str(seed)})
    return params


def populate(uri: str, trials: int, steps: int) -> str:
    """The parent run's id, after its ``trials`` children are logged."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"report-bench-{time.time_ns()}")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    base = base_spec()
    configs = [(a, b) for a in AGGREGATORS for b in ATTACKS]
    validated = {i: trial_params(base, a, b, 0) for i, (a, b) in enumerate(configs)}  # validate once per config

    def one(i: int) -> None:
        rng = random.Random(i)
        params = dict(validated[i % len(configs)], **{"train.seed": str(i // len(configs)),
                                                       "sweep.train.seed": str(i // len(configs))})
        run = client.create_run(exp, run_name=f"sweep-trial-{i}", tags={"mlflow.parentRunId": parent})
        rate = 30 + 10 * (i % len(configs))
        now = int(time.time() * 1000)
        metrics = [Metric("train/loss", 2.3 * math.exp(-s / rate) + 0.05 * rng.random(), now + s, s)
                   for s in range(steps)]
        metrics += [Metric("eval/accuracy", 1 - 0.9 * math.exp(-s / rate) - 0.05 * rng.random(), now + s, s)
                    for s in range(steps)]
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
        client.set_terminated(run.info.run_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(trials)))
    return str(parent)


def timed_phases(uri: str, parent: str) -> tuple[float, float, float]:
    """The steps of ``report_html`` one by one: reading MLflow, building, drawing and rendering."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    start = time.perf_counter()
    trials = find_trials(client, [parent])
    metrics = choose_metrics(trials, None)
    trials = load_histories(client, trials, metrics)
    read = time.perf_counter()
    report = build_report(trials, metrics)
    built = time.perf_counter()
    render_html(report, title="bench")
    return read - start, built - read, time.perf_counter() - built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="reports timed (the first pays matplotlib's import)")
    args = parser.parse_args()
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # a line per trial otherwise
    with tempfile.TemporaryDirectory(prefix="report-bench-") as home:
        stack = Stack(home=Path(home), mlflow_port=free_port(25600))
        stack.mlflow_port = free_port(stack.mlflow_port)
        stack.start_mlflow()
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{stack.mlflow_uri}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"MLflow did not start (see {home}/logs/mlflow.log)")
                time.sleep(0.3)
            start = time.perf_counter()
            parent = populate(stack.mlflow_uri, args.trials, args.steps)
            logged = time.perf_counter() - start
            print(f"logged {args.trials} trials x 2 metrics x {args.steps} steps in {logged:.1f} s")
            print("\n| report | trials | read MLflow (s) | build (s) | draw + HTML (s) | total, as the API | page |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for i in range(args.repeat):
                phases = timed_phases(stack.mlflow_uri, parent)
                start = time.perf_counter()
                page = report_html(stack.mlflow_uri, [parent], title="bench")
                total = time.perf_counter() - start
                cold = " (cold)" if i == 0 else ""
                print(f"| {i + 1}{cold} | {args.trials} | {phases[0]:.2f} | {phases[1]:.2f} | {phases[2]:.2f} | "
                      f"{total:.2f} | {len(page) / 1e3:.0f} kB |")
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
