"""The ``deepspeed`` strategy on real Ray Train (gloo, 2 CPU workers) with a real MLflow.

- ZeRO 0, 1, 2 and 3 train a tiny Llama (loss falls) with the same per-step loss curve as ddp for
  the same seed and data; so do GaLore at ZeRO-2 (whole-matrix state partitioning) and a robust
  aggregation rule at stage 0 against their ddp runs. The runs share one Ray Train worker group
  (each through the worker's real ``train_worker``, one after another), which saves a worker-group
  start and a DeepSpeed import per run on a 2-core machine; each run starts fresh (no checkpoint
  handed over).
- A worker killed mid-run (``faults.kill``) under ZeRO-3 restarts from the last sharded checkpoint
  (``FailureConfig``) and finishes; the checkpoint holds both ranks' shards in one directory.
"""

import copy
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from service.spec import ExperimentSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 8


def tiny_spec(name: str, strategy: str, stage: int | None = None, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "task": {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": 32},
                 "model": {"name": "llama", "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64}},
        # SGD with momentum: unlike Adam, its update scales with the gradient, so a wrongly
        # averaged or accumulated gradient shows in the curve. Accumulation 2, clipping on.
        "train": {"max_steps": STEPS, "batch_size": 16, "grad_accum": 2, "log_every": 1, "seed": 3,
                  "grad_clip": 2.0, "eval_batches": 2},
        "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
        "distributed": {"num_workers": 2, "strategy": strategy},
    }
    if stage is not None:
        spec["distributed"]["deepspeed"] = {"zero_stage": stage}
    for section, values in sections.items():
        spec[section] = values if section == "optimizer" else {**spec.get(section, {}), **values}
    return ExperimentSpec.model_validate(spec).resolved()


GALORE = {"optimizer": {"name": "galore", "lr": 0.05, "rank": 4, "update_proj_gap": 4}}
MEDIAN = {"distributed": {"aggregator": {"name": "median"}}}
# (run, strategy, ZeRO stage, changes, the ddp run it must match)
RUNS: list[tuple[str, str, int | None, dict[str, Any], str]] = [
    ("ddp", "ddp", None, {}, "ddp"),
    *[(f"zero{s}", "deepspeed", s, {}, "ddp") for s in range(4)],
    # GaLore at ZeRO-2: DeepSpeed at stage 0 + PartitionedOptimizer (state split by whole matrices)
    ("ddp-galore", "ddp", None, GALORE, "ddp-galore"),
    ("zero2-galore", "deepspeed", 2, GALORE, "ddp-galore"),
    # a robust rule: the engine's all-reduce off, the loop's exchange combines the ranks' gradients
    ("ddp-median", "ddp", None, MEDIAN, "ddp-median"),
    ("zero0-median", "deepspeed", 0, MEDIAN, "ddp-median"),
]


def _train_many(config: dict[str, Any]) -> None:
    """Ray Train worker function: the real ``train_worker`` once per run, each from scratch."""
    import ray.train

    from workers.train_loop import train_worker

    for run in config["runs"]:
        ray.train.get_checkpoint = lambda: None  # type: ignore[assignment]  # a fresh run, not a resume
        train_worker({"spec": run["spec"], "mlflow_uri": config["mlflow_uri"],
                      "mlflow_run_id": run["mlflow_run_id"], "log_spec": False})


def new_run(mlflow: MlflowClient, name: str) -> str:
    exp = mlflow.get_experiment_by_name("deepspeed-tests")
    exp_id = exp.experiment_id if exp else mlflow.create_experiment("deepspeed-tests")
    return str(mlflow.create_run(exp_id, run_name=name).info.run_id)


def curve(mlflow: MlflowClient, run_id: str, key: str = "train/loss") -> list[float]:
    history = sorted(mlflow.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    by_step = {m.step: m.value for m in history}  # the latest value per step
    return [by_step[s] for s in sorted(by_step)]


def test_zero_stages_match_ddp(ray_on_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    mlflow = MlflowClient(ray_on_stack.mlflow_uri)
    run_ids = {name: new_run(mlflow, name) for name, *_ in RUNS}
    runs = [{"spec": ExperimentSpec.model_validate(tiny_spec(f"ds-{name}", strategy, stage, **changes)),
             "mlflow_run_id": run_ids[name]}
            for name, strategy, stage, changes, _ in RUNS]
    trainer = TorchTrainer(
        _train_many,
        train_loop_config={"runs": runs, "mlflow_uri": ray_on_stack.mlflow_uri},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1.0}),
        run_config=RunConfig(name="deepspeed-vs-ddp", storage_path=str(tmp_path)),
    )
    trainer.fit()

    for name, strategy, _, _, reference in RUNS:
        losses, ref = curve(mlflow, run_ids[name]), curve(mlflow, run_ids[reference])
        assert len(losses) == STEPS, (name, losses)
        assert losses[-1] < 0.9 * losses[0], (name, losses)  # it trains
        if strategy == "ddp":
            continue
        diffs = [abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True)]
        assert max(diffs) < 2e-4, (name, losses, ref)
        # the final evaluation runs on the consolidated model (ZeRO-3: gathered from both ranks)
        final, ref_final = curve(mlflow, run_ids[name], "eval/loss")[-1], curve(mlflow, run_ids[reference],
                                                                                 "eval/loss")[-1]
        assert abs(final - ref_final) / ref_final < 2e-4, (name, final, ref_final)
        artifacts = {a.path for a in mlflow.list_artifacts(run_ids[name], "model")}
        assert {"model/state_dict.pt", "model/spec.json"} <= artifacts, (name, artifacts)


def test_killed_worker_resumes_from_sharded_checkpoint(ray_on_stack, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from workers.launch_train import run_trainer

    mlflow = MlflowClient(ray_on_stack.mlflow_uri)
    doc = copy.deepcopy(tiny_spec("ds-kill", "deepspeed", 3))
    doc["train"].update({"max_steps": 6, "checkpoint_every": 3})
    doc["faults"] = {"kill": {"rank": 1, "step": 4}}
    doc["distributed"]["max_failures"] = 1
    spec = ExperimentSpec.model_validate(doc)
    run_id = new_run(mlflow, "kill")
    metrics = run_trainer(spec, run_id="ds-kill", mlflow_uri=ray_on_stack.mlflow_uri, mlflow_run_id=run_id,
                          storage_path=str(tmp_path), log_spec=False)
    assert metrics["step"] == 6
    # The loop logs model/params at the step it starts from: 0, then 3 after the restore.
    starts = sorted(m.step for m in mlflow.get_metric_history(run_id, "model/params"))
    assert starts == [0, 3], starts
    losses = curve(mlflow, run_id)
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses
    # Each kept checkpoint holds both ranks' ZeRO-3 shards (merged by Ray Train from two folders).
    shards = sorted(p.name for p in tmp_path.glob("orchestra-ds-kill/checkpoint_*/step6/*.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], shards
