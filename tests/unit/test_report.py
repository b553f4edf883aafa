"""Comparison reports without MLflow: grouping (leaf and block paths, the default), the statistics
against numpy by hand, the spec differences, the page's self-containment, the trials' reading
through a stand-in client, and the route's refusals."""

import base64
import io
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.report import ReportError, Trial, build_report, render_html
from service.report.build import check_names, choose_metrics, default_metrics
from service.report.data import find_trials, load_histories
from service.report.publish import mlflow_run_ids
from service.report.stats import Curve, Summary, default_group_by, group_trials, mode_of

ROOT = Path(__file__).resolve().parents[2]
AGGREGATORS = [{"name": "mean"}, {"name": "flag", "f": "2", "lam": "0.0"}, {"name": "flag", "f": "3", "lam": "0.0"},
               {"name": "krum", "f": "2"}]


def trial(i: int, params: dict[str, str], history: dict[str, list[tuple[int, float]]],
          parent: str | None = "p" * 32, status: str = "FINISHED") -> Trial:
    return Trial(run_id=f"{i:032x}", name=f"t{i}", params=params, history=history, parent_id=parent, status=status,
                 latest={m: pts[-1][1] for m, pts in history.items() if pts})


def sweep_trials(seeds: int = 3) -> list[Trial]:
    """A sweep over the aggregator block and the seed: 4 aggregators x ``seeds`` seeds."""
    out: list[Trial] = []
    for a, agg in enumerate(AGGREGATORS):
        for seed in range(seeds):
            params = {"name": "robust", "train.seed": str(seed), "faults.byzantine.seed": "7", "optimizer.name": "sgd",
                      "optimizer.lr": "0.1", "tags.owner": "x", "code.bundle": "ab" * 32,
                      **{f"distributed.aggregator.{k}": v for k, v in agg.items()},
                      "sweep.distributed.aggregator": str(agg), "sweep.train.seed": str(seed)}
            i = len(out)
            loss = [(s, 2.0 / (1 + s * (a + 1) / 10) + 0.01 * seed) for s in range(0, 50, 10)]
            acc = [(25, 0.5 + 0.1 * a + 0.01 * seed), (50, 0.6 + 0.1 * a + 0.02 * seed)]
            out.append(trial(i, params, {"train/loss": loss, "eval/accuracy": acc}))
    return out


# ---- grouping ---------------------------------------------------------------------------------


def test_default_group_by_is_the_swept_paths_but_the_seed() -> None:
    trials = sweep_trials()
    assert default_group_by(trials) == ["distributed.aggregator"]
    # runs that are their own trial (a sweep's parent without children, a plain run): nothing swept
    parent = trial(98, {"sweep.parameters.optimizer.lr.grid": "[0.1, 1]", "sweep.metric": "eval/loss"}, {}, parent=None)
    assert default_group_by([parent, trial(99, {"optimizer.name": "sgd"}, {}, parent=None)]) == []


def test_a_block_path_groups_by_method_and_settings_with_compact_labels() -> None:
    report = build_report(sweep_trials(), ["train/loss"])
    assert report.group_by == ["distributed.aggregator"]
    # the name, and the settings that tell apart groups of one name (flag's f; not its lam, nor krum's f)
    assert [g.label for g in report.groups] == ["flag f=2", "flag f=3", "krum", "mean"]
    assert all(len(g.trials) == 3 for g in report.groups)
    assert {t.params["train.seed"] for t in report.groups[0].trials} == {"0", "1", "2"}


def test_leaf_paths_and_several_paths() -> None:
    trials = sweep_trials()
    by_name = group_trials(trials, ["distributed.aggregator.name"])
    assert [(label, len(members)) for _, label, members in by_name] == [("flag", 6), ("krum", 3), ("mean", 3)]
    both = group_trials(trials, ["distributed.aggregator.name", "distributed.aggregator.f"])
    assert [label for _, label, _ in both] == ["aggregator=flag, f=2", "aggregator=flag, f=3", "aggregator=krum, f=2",
                                               "aggregator=mean, f=None"]


def test_numbers_sort_as_numbers() -> None:
    lrs = ["0.1", "1e-3", "0.01"]
    trials = [trial(i, {"optimizer.lr": lr}, {"train/loss": [(0, 1.0)]}) for i, lr in enumerate(lrs)]
    assert [label for _, label, _ in group_trials(trials, ["optimizer.lr"])] == ["1e-3", "0.01", "0.1"]


def test_a_command_trial_groups_by_its_sampled_value() -> None:
    trials = [trial(i, {"sweep.task.params.width": w, "sweep.train.seed": "0"}, {"train/loss": [(0, 1.0)]})
              for i, w in enumerate(["8", "16"])]
    report = build_report(trials, ["train/loss"])
    assert report.group_by == ["task.params.width"]
    assert [g.label for g in report.groups] == ["8", "16"]
    assert report.differences == {"task.params.width": ["8", "16"]}


def test_unknown_paths_and_metrics_are_refused_by_name() -> None:
    trials = sweep_trials()
    with pytest.raises(ReportError) as err:
        build_report(trials, ["train/loss"], ["distributed.agregator"])
    assert err.value.field == "group_by" and "distributed.aggregator" in str(err.value)  # the near miss
    with pytest.raises(ReportError) as err:
        choose_metrics(trials, ["eval/f1"])
    assert err.value.field == "metric" and "eval/accuracy" in str(err.value)
    bad = ((["a\nb"], None, "metric"), (None, ["a..b"], "group_by"), (None, ["a b"], "group_by"))
    for metrics, paths, field in bad:
        with pytest.raises(ReportError) as err:
            check_names(metrics, paths)
        assert err.value.field == field
    assert default_metrics(trials) == ["train/loss", "eval/accuracy"]
    assert choose_metrics(trials, None) == ["train/loss", "eval/accuracy"]


# ---- statistics -------------------------------------------------------------------------------


def test_final_and_best_over_seeds_match_numpy() -> None:
    report = build_report(sweep_trials(), ["train/loss", "eval/accuracy"])
    flag2 = report.groups[0]
    finals = np.array([t.history["train/loss"][-1][1] for t in flag2.trials])
    bests = np.array([min(v for _, v in t.history["train/loss"]) for t in flag2.trials])
    acc_best = np.array([max(v for _, v in t.history["eval/accuracy"]) for t in flag2.trials])
    assert flag2.final["train/loss"] == pytest.approx(list(finals))
    s = flag2.summary("train/loss")
    assert (s.mean, s.std, s.n) == (pytest.approx(finals.mean()), pytest.approx(finals.std(ddof=1)), 3)
    assert flag2.summary("train/loss", "best").mean == pytest.approx(bests.mean())
    assert flag2.summary("eval/accuracy", "best").mean == pytest.approx(acc_best.mean())  # accuracy: the highest
    assert report.values("eval/accuracy", "best")["flag f=2"] == pytest.approx(list(acc_best))
    assert report.modes == {"train/loss": "min", "eval/accuracy": "max"}
    assert mode_of("eval/perplexity") == "max" and mode_of("eval/perplexity", {"eval/perplexity": "min"}) == "min"


def test_summary_leaves_out_non_finite_values_and_says_so() -> None:
    s = Summary.of([1.0, 3.0, math.nan, math.inf])
    assert (s.mean, s.std, s.n, s.left_out) == (2.0, pytest.approx(np.std([1.0, 3.0], ddof=1)), 2, 2)
    one = Summary.of([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and one.n == 1


def test_curves_align_steps_and_match_numpy() -> None:
    a = [(0, 1.0), (10, 0.5), (20, 0.25)]
    b = [(0, 3.0), (10, 1.5)]  # stopped early
    c = [(0, 2.0), (10, math.inf), (20, 0.75)]  # a diverged point is left out
    curve = Curve.of([a, b, c], "std")
    assert list(curve.steps) == [0, 10, 20] and list(curve.count) == [3, 2, 2]
    grid = [np.array([1.0, 3.0, 2.0]), np.array([0.5, 1.5]), np.array([0.25, 0.75])]
    assert curve.mean == pytest.approx([g.mean() for g in grid])
    assert curve.high - curve.mean == pytest.approx([g.std(ddof=1) for g in grid])
    assert curve.mean - curve.low == pytest.approx([g.std(ddof=1) for g in grid])
    spread = Curve.of([a, b, c], "minmax")
    assert spread.low == pytest.approx([g.min() for g in grid])
    assert spread.high == pytest.approx([g.max() for g in grid])
    lone = Curve.of([a], "std")
    assert list(lone.low) == list(lone.mean) == list(lone.high)  # one trial: no band


# ---- spec differences and what is aggregated over ---------------------------------------------


def test_spec_differences_leave_out_seeds_names_ids_and_bookkeeping() -> None:
    trials = sweep_trials()
    trials[0].params["init.from_run"] = "f" * 32  # a run id: differs, but says nothing about the method
    trials[1].params["optimizer.lr"] = "0.2"  # differs inside the group "mean" (the last one)
    report = build_report(trials, ["train/loss"])
    assert set(report.differences) == {"distributed.aggregator.name", "distributed.aggregator.f",
                                       "distributed.aggregator.lam", "optimizer.lr"}
    assert report.differences["distributed.aggregator.f"] == ["2", "3", "2", "None"]
    assert report.differences["optimizer.lr"] == ["0.1", "0.1", "0.1", "0.1 | 0.2"]
    assert report.pooled == {"optimizer.lr": ["0.1", "0.2"], "train.seed": ["0", "1", "2"]}


def test_no_sweep_is_one_group_with_a_note() -> None:
    runs = [trial(i, {"optimizer.name": "sgd", "train.seed": str(i)}, {"train/loss": [(0, float(i))]}, parent=None)
            for i in range(2)]
    report = build_report(runs, ["train/loss"])
    assert [g.label for g in report.groups] == ["all"] and report.notes


# ---- the page ---------------------------------------------------------------------------------


def test_the_page_is_self_contained_and_its_images_are_pngs() -> None:
    trials = sweep_trials()
    trials.append(trial(50, {**trials[0].params, "train.seed": "9"}, {"train/loss": [(0, 1.0)]}, status="FAILED"))
    report = build_report(trials, ["train/loss", "eval/accuracy"])
    page = render_html(report, title="Flag <vs> rules", sections=[("Claims & verdicts", "<p id='claims'>holds</p>")])
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched from elsewhere
    assert "<title>Flag &lt;vs&gt; rules</title>" in page and "<h2>Claims &amp; verdicts</h2>" in page
    assert "<p id='claims'>holds</p>" in page  # a caller's fragment is HTML
    assert page.index("Claims &amp; verdicts") < page.index("<h2>train/loss</h2>")
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert img.format == "PNG" and img.width > 300
    assert "Spec differences between groups" in page and "not FINISHED (FAILED)" in page
    assert "sample standard deviation" in page  # the caption says what the band is


# ---- reading MLflow (a stand-in client) -------------------------------------------------------


class FakeClient:
    """Two sweeps (one with 3 trials over two pages) and a plain run, as MLflow's client gives them."""

    def __init__(self) -> None:
        def run(run_id: str, exp: str, params: dict[str, str], metrics: dict[str, float]) -> Any:
            return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=exp, run_name=run_id,
                                                        status="FINISHED"),
                                   data=SimpleNamespace(params=params, metrics=metrics))
        self.runs = {"sweep": run("sweep", "1", {"sweep.metric": "eval/loss"}, {}),
                     "plain": run("plain", "2", {"train.seed": "0"}, {"train/loss": 0.5})}
        self.children = {"sweep": [run(f"c{i}", "1", {"sweep.optimizer.lr": str(i)}, {"train/loss": 1.0})
                                   for i in range(3)]}
        self.searches: list[str] = []
        self.histories = 0

    def get_run(self, run_id: str) -> Any:
        return self.runs[run_id]

    def search_runs(self, experiments: list[str], *, filter_string: str, max_results: int,
                    page_token: str | None) -> Any:
        self.searches.append(filter_string)
        parent = re.search(r"'(\w+)'", filter_string).group(1)  # type: ignore[union-attr]
        kids = self.children.get(parent, [])
        start = int(page_token or 0)
        page = SimpleNamespace(items=kids[start:start + 2], token=str(start + 2) if start + 2 < len(kids) else None)
        return type("Page", (list,), {"token": page.token})(page.items)

    def get_metric_history(self, run_id: str, key: str) -> list[Any]:
        self.histories += 1
        point = SimpleNamespace
        return [point(step=10, timestamp=5, value=0.3), point(step=0, timestamp=1, value=1.0),
                point(step=10, timestamp=2, value=9.0)]


def test_trials_are_children_else_the_run_and_histories_come_in_bulk() -> None:
    client = FakeClient()
    trials = find_trials(client, ["sweep", "plain", "sweep"])  # type: ignore[arg-type]
    assert [(t.run_id, t.parent_id) for t in trials] == [("c0", "sweep"), ("c1", "sweep"), ("c2", "sweep"),
                                                         ("plain", None)]
    assert client.searches == ["tags.mlflow.parentRunId = 'sweep'"] * 2 + ["tags.mlflow.parentRunId = 'plain'"]
    loaded = load_histories(client, trials, ["train/loss"])  # type: ignore[arg-type]
    assert client.histories == 4  # one read per trial and metric, not per point
    assert loaded[0].history["train/loss"] == [(0, 1.0), (10, 0.3)]  # a step logged twice: its latest value
    with pytest.raises(ReportError):
        find_trials(client, ["x' OR '1"])  # type: ignore[arg-type]


def test_run_ids_of_experiments_as_json_or_domain_objects() -> None:
    as_json = [{"runs": [{"mlflow_run_id": "a"}, {"mlflow_run_id": None}]}, {"runs": [{"mlflow_run_id": "b"}]}]
    domain = SimpleNamespace(runs=[SimpleNamespace(mlflow_run_id="c")])
    assert mlflow_run_ids([*as_json, domain]) == ["a", "b", "c"]  # type: ignore[list-item]


def test_the_api_starts_without_matplotlib() -> None:
    code = "import sys, api.main; assert 'matplotlib' not in sys.modules, 'matplotlib imported at start'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---- the route's refusals (no MLflow needed) --------------------------------------------------


def test_route_refusals(tmp_path: Path) -> None:
    from tests.api_harness import make_client
    from tests.unit.test_api import QUICKSTART

    client = make_client(f"sqlite:///{tmp_path / 'api.db'}")
    exp = client.post("/v1/experiments", content=QUICKSTART, headers={"Content-Type": "application/yaml"}).json()
    url = f"/v1/experiments/{exp['id']}/report"
    missing = client.get(f"/v1/experiments/{'0' * 32}/report")
    assert missing.status_code == 404 and missing.json()["detail"][0]["field"] == "experiment_id"
    other = client.get(url, params={"also": "0" * 32})
    assert other.status_code == 404 and other.json()["detail"][0]["field"] == "also"
    for params, field in (({"metric": "bad\nname"}, "metric"), ({"group_by": "a..b"}, "group_by"),
                          ({"metric": [f"m{i}" for i in range(21)]}, "metric")):
        r = client.get(url, params=params)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text
    queued = client.get(url)  # no MLflow run yet
    assert queued.status_code == 409 and queued.json()["detail"][0]["field"] == "experiment_id"
