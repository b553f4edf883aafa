"""Merge runs: the worker against a real MLflow (no Ray), then a merge through the whole stack."""

import json
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from tests.conftest import small_spec, wait_for

pytestmark = [pytest.mark.integration]


def _merge_spec(name: str, merge: dict) -> dict:  # type: ignore[type-arg]
    return {"name": name, "task": {"kind": "merge", "dataset": {"name": "digits"}}, "merge": merge}


# ---- the worker alone, on an MLflow SQLite store ----------------------------------------------------


def _train_and_log(client: MlflowClient, uri: str, exp: str, classes: list[int], seed: int) -> str:
    from service.spec import ExperimentSpec
    from workers.mlflow_log import RunLogger
    from workers.model_io import save_final_model
    from workers.tasks import build_task

    spec = ExperimentSpec.model_validate(small_spec(f"half-{seed}") | {"distributed": {"num_workers": 1}})
    spec.task.dataset.classes = classes  # type: ignore[union-attr]
    torch.manual_seed(seed)
    task = build_task(spec)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = task.x_tr, task.y_tr  # type: ignore[attr-defined]
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    run = client.create_run(exp, tags={"orchestra.run_id": f"orch-{seed}"})
    logger = RunLogger(uri, run.info.run_id)
    save_final_model(logger, spec, model)
    logger.finish()
    return str(run.info.run_id)


def test_worker_resolves_every_kind_of_input_and_logs_the_merge(tmp_path: Path) -> None:
    from service.spec import ExperimentSpec
    from workers.merge_job import load_model, run_merge
    from workers.tasks import build_task

    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("merge-worker", artifact_location=str(tmp_path / "artifacts"))
    r1 = _train_and_log(client, uri, exp, [0, 1, 2, 3, 4], 1)
    _train_and_log(client, uri, exp, [5, 6, 7, 8, 9], 2)
    local = client.download_artifacts(r1, "model", str(tmp_path / "local"))

    # an Orchestra run id, an MLflow runs:/ URI and a local folder; PLeaS at 1.5x width
    merge = {"method": "pleas", "inputs": [local, "orch-2"], "target_width": 1.5, "data": {"batches": 8}}
    run = client.create_run(exp)
    metrics = run_merge(ExperimentSpec.model_validate(_merge_spec("m", merge)), run_id="m1", mlflow_uri=uri,
                        mlflow_run_id=run.info.run_id)
    logged = client.get_run(run.info.run_id).data
    for key in ("eval/accuracy", "inputs/0/eval/accuracy", "inputs/1/eval/accuracy", "ensemble/eval/accuracy"):
        assert logged.metrics[key] == pytest.approx(metrics[key])
    assert logged.tags["orchestra.merge.method"] == "pleas"
    # each input saw half of the classes; the merged model must know both halves
    assert metrics["eval/accuracy"] > max(metrics["inputs/0/eval/accuracy"], metrics["inputs/1/eval/accuracy"])
    # the logged model rebuilds (at its merged width) and scores what was logged
    folder = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "merged"))
    merged, spec = load_model(folder)
    assert spec.task.model.hidden == [96]  # type: ignore[union-attr]
    evaluated = build_task(spec).evaluate(merged, torch.device("cpu"), 8)
    assert evaluated["eval/accuracy"] == pytest.approx(metrics["eval/accuracy"])

    # a merged model is itself an input (runs:/ URI), and an unknown id is a clear error
    again = _merge_spec("m2", {"method": "average", "inputs": [f"runs:/{run.info.run_id}/model", f"runs:/{r1}/model"]})
    with pytest.raises(ValueError, match="shape"):  # 96 vs 64 hidden units: average refuses
        run_merge(ExperimentSpec.model_validate(again), run_id="m2", mlflow_uri=uri, mlflow_run_id="")
    bad = _merge_spec("m3", {"method": "average", "inputs": ["orch-1", "no-such-run"]})
    with pytest.raises(ValueError, match="no-such-run"):
        run_merge(ExperimentSpec.model_validate(bad), run_id="m3", mlflow_uri=uri, mlflow_run_id="")


class _FolderLogger:
    """Stands in for RunLogger: artifacts go to a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        import shutil

        shutil.copytree(local_dir, self.root / artifact_path)

    def metrics(self, values: dict, step: int) -> None:  # type: ignore[type-arg]
        pass


def _peft_run(root: Path, lr: float) -> Path:
    """A LoRA run of a tiny Llama, trained and saved as the training loop does."""
    from service.spec import ExperimentSpec
    from workers.model_io import save_final_model
    from workers.peft_hooks import apply_peft
    from workers.tasks import build_task

    spec = ExperimentSpec.model_validate({
        "name": "lora", "task": {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": 16},
                                 "model": {"name": "llama", "hidden": 16, "layers": 1, "heads": 2,
                                           "intermediate": 32}},
        "train": {"max_steps": 5, "batch_size": 4, "seed": 3}, "optimizer": {"name": "adamw", "lr": lr},
        "peft": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    })  # fmt: skip
    torch.manual_seed(spec.train.seed)  # type: ignore[union-attr]
    task = build_task(spec)
    model, handle = apply_peft(spec, task.build_model(), task)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = task.batches(rank=0, world=1, batch_size=4, seed=0)
    for _ in range(5):
        opt.zero_grad()
        task.loss(model, next(batches)).backward()
        opt.step()
    save_final_model(_FolderLogger(root), spec, model, handle)
    return root / "model"


def test_worker_merges_lora_runs_by_their_adapter_deltas(tmp_path: Path) -> None:
    """Two LoRA runs on one base: task arithmetic with no merge.base adds both adapter deltas to the
    shared base, which the worker rebuilds from the runs' spec."""
    from service.spec import ExperimentSpec
    from workers.merge_job import load_model, run_merge

    torch.set_num_threads(1)
    folders = [_peft_run(tmp_path / "a", 0.05), _peft_run(tmp_path / "b", 0.02)]
    dense = [torch.load(f / "state_dict.pt", weights_only=True) for f in folders]
    loaded, _ = load_model(str(folders[0]))
    assert hasattr(loaded, "peft_config")  # taken as an adapter on its base
    base = loaded.unload().state_dict()  # type: ignore[operator]
    assert any(not torch.equal(dense[0][k], base[k]) for k in base)

    spec = {"name": "m", "task": {"kind": "merge", "dataset": {"name": "char_corpus", "seq_len": 16}},
            "merge": {"method": "task_arithmetic", "inputs": [str(f) for f in folders], "base": "adapters"}}
    metrics = run_merge(ExperimentSpec.model_validate(spec), run_id="m", mlflow_uri="", mlflow_run_id="")
    assert {"eval/loss", "inputs/0/eval/loss", "inputs/1/eval/loss"} <= metrics.keys()
    with torch.no_grad():
        from algorithms.merging.registry import build

        a, _ = load_model(str(folders[0]))
        b, _ = load_model(str(folders[1]))
        merged = build("task_arithmetic", inputs=[str(f) for f in folders]).merge([a, b]).state_dict()
    for k, w0 in base.items():
        torch.testing.assert_close(merged[k], dense[0][k] + dense[1][k] - w0, atol=1e-5, rtol=1e-5, msg=k)


def test_worker_fits_atlas_coefficients_on_the_tasks_loss(tmp_path: Path) -> None:
    """aTLAS through the spec's options: from the default zero start and no steps the merge is the
    shared base under the adapters; with steps the per-task coefficients are fitted on the task's
    own loss (char LM batches are not (x, y) pairs: only the worker's ``loss_fn`` can train on them)
    and the merged model's loss drops below the base's."""
    from service.spec import ExperimentSpec
    from workers.merge_job import eval_spec, load_model, run_merge
    from workers.tasks import build_task

    torch.set_num_threads(1)
    folders = [_peft_run(tmp_path / "a", 0.05), _peft_run(tmp_path / "b", 0.02)]

    def merge(**atlas: object) -> dict[str, float]:
        spec = {"name": "m", "task": {"kind": "merge", "dataset": {"name": "char_corpus", "seq_len": 16}},
                "merge": {"method": "atlas", "inputs": [str(f) for f in folders], "base": "adapters", **atlas}}
        return run_merge(ExperimentSpec.model_validate(spec), run_id="m", mlflow_uri="", mlflow_run_id="")

    start = merge(steps=0)
    adapted, source = load_model(str(folders[0]))
    base = adapted.unload()  # type: ignore[operator]
    spec_eval = eval_spec(ExperimentSpec.model_validate({
        "name": "m", "task": {"kind": "merge", "dataset": {"name": "char_corpus", "seq_len": 16}},
        "merge": {"method": "atlas", "inputs": ["a", "b"], "base": "adapters"}}), source)  # fmt: skip
    assert spec_eval.train is not None
    base_loss = build_task(spec_eval).evaluate(base, torch.device("cpu"), spec_eval.train.eval_batches)["eval/loss"]
    assert start["eval/loss"] == pytest.approx(base_loss, rel=1e-6)

    fitted = merge(steps=30, lr=0.05, blockwise=False, data={"batches": 4, "batch_size": 8})
    assert fitted["eval/loss"] < base_loss - 1e-3, (fitted["eval/loss"], base_loss)


# ---- through the API, on Ray ------------------------------------------------------------------------


@pytest.mark.slow
def test_merge_of_two_finished_runs_through_the_api(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    ids = []
    for half, classes in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
        spec = small_spec(f"it-merge-half{half}", max_steps=40, eval_every=40, seed=half)
        spec["task"]["dataset"]["classes"] = classes
        spec["distributed"]["num_workers"] = 1
        ids.append(client.post("/v1/experiments", json=spec).json()["id"])
    runs = []
    for exp_id in ids:
        exp = wait_for(client, exp_id, {"succeeded", "failed", "cancelled"})
        assert exp["status"] == "succeeded", exp["runs"][0]["error"]
        runs.append(exp["runs"][0]["id"])

    merge = {"method": "pleas", "inputs": runs, "data": {"batches": 4}}
    resp = client.post("/v1/experiments", json=_merge_spec("it-merge", merge))
    assert resp.status_code in (200, 201), resp.text
    exp = wait_for(client, resp.json()["id"], {"succeeded", "failed", "cancelled"})
    run = exp["runs"][0]
    assert exp["status"] == "succeeded", run["error"]
    mlflow = MlflowClient(stack.mlflow_uri)
    data = mlflow.get_run(run["mlflow_run_id"]).data
    for key in ("eval/accuracy", "eval/loss", "inputs/0/eval/accuracy", "inputs/1/eval/accuracy",
                "ensemble/eval/accuracy", "merge/seconds"):
        assert key in data.metrics, sorted(data.metrics)
    assert json.loads(data.tags["orchestra.merge.inputs"]) == runs
    assert {a.path for a in mlflow.list_artifacts(run["mlflow_run_id"], "model")} >= {"model/state_dict.pt",
                                                                                       "model/spec.json"}
