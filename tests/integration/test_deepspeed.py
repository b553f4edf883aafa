"""The ``deepspeed`` strategy on real Ray Train (gloo, 2 CPU workers) with a real MLflow.

- ZeRO 0, 1, 2 and 3 train a tiny Llama (loss falls) with the same per-step loss curve as ddp for
  the same seed and data. The five runs share one Ray Train worker group (each through the
  worker's real ``train_worker``, one after another), which saves four worker-group starts and
  four DeepSpeed imports on a 2-core machine; each run starts fresh (no checkpoint handed over).
- A worker killed mid-run (``faults.kill``) under ZeRO-3 restarts from the last sharded checkpoint
  (``FailureConfig``) and finishes; the checkpoint holds both ranks' shards in one directory.
"""

import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from service.spec import ExperimentSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def tiny_spec(name: str, strategy: str, stage: int | None = None) -> dict[str, Any]:
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
    return ExperimentSpec.model_validate(spec).resolved()


def _train_many(config: dict[str, Any]) -> None:
    """Ray Train worker function: the real ``train_worker`` once per run, each from scratch."""
    import ray.train

    from workers.train_loop import train_worker

    for run in config["runs"]:
        ray.train.get_checkpoint = lambda: None  # type: ignore[assignment]  # a fresh run, not a resume
        train_worker({"spec": run["spec"], "mlflow_uri": config["mlflow_uri"],
                      "mlflow_run_id": run["mlflow_run_id"], "log_spec": False})


@pytest.fixture(scope="module")
def ray_on_stack(stack):  # type: ignore[no-untyped-def]
    import ray

    # The workers import this test module (for _train_many) from the repository root.
    path = os.pathsep.join([str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    ray.init(address=f"127.0.0.1:{stack.gcs_port}", runtime_env={"env_vars": {"PYTHONPATH": path}},
             log_to_driver=False)
    try:
        yield stack
    finally:
        ray.shutdown()


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

    sys.path.insert(0, str(ROOT))
    mlflow = MlflowClient(ray_on_stack.mlflow_uri)
    names = ["ddp", "zero0", "zero1", "zero2", "zero3"]
    specs = [tiny_spec("ds-ddp", "ddp")] + [tiny_spec(f"ds-zero{s}", "deepspeed", s) for s in range(4)]
    runs: list[dict[str, Any]] = [{"spec": spec, "mlflow_run_id": new_run(mlflow, name)}
                                  for name, spec in zip(names, specs, strict=True)]
    trainer = TorchTrainer(
        _train_many,
        train_loop_config={"runs": runs, "mlflow_uri": ray_on_stack.mlflow_uri},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1.0}),
        run_config=RunConfig(name="deepspeed-vs-ddp", storage_path=str(tmp_path)),
    )
    trainer.fit()

    curves = {name: curve(mlflow, run["mlflow_run_id"]) for name, run in zip(names, runs, strict=True)}
    ddp = curves["ddp"]
    assert len(ddp) == STEPS
    assert ddp[-1] < 0.8 * ddp[0], ddp  # it trains
    for name in names[1:]:
        ds = curves[name]
        assert len(ds) == STEPS, (name, ds)
        assert ds[-1] < 0.8 * ds[0], (name, ds)
        diffs = [abs(a - b) / abs(b) for a, b in zip(ds, ddp, strict=True)]
        assert max(diffs) < 2e-4, (name, ds, ddp)
        eval_ds, eval_ddp = curve(mlflow, runs[names.index(name)]["mlflow_run_id"], "eval/loss")[-1], \
            curve(mlflow, runs[0]["mlflow_run_id"], "eval/loss")[-1]
        assert abs(eval_ds - eval_ddp) / eval_ddp < 2e-4, (name, eval_ds, eval_ddp)
        # The consolidated final model (ZeRO-3: gathered from both ranks) is the MLflow artifact.
        artifacts = {a.path for a in mlflow.list_artifacts(runs[names.index(name)]["mlflow_run_id"], "model")}
        assert {"model/state_dict.pt", "model/spec.json"} <= artifacts, (name, artifacts)


def test_killed_worker_resumes_from_sharded_checkpoint(ray_on_stack, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from workers.launch_train import run_trainer

    mlflow = MlflowClient(ray_on_stack.mlflow_uri)
    doc = copy.deepcopy(tiny_spec("ds-kill", "deepspeed", 3))
    doc["train"].update({"max_steps": 8, "checkpoint_every": 3})
    doc["faults"] = {"kill": {"rank": 1, "step": 5}}
    doc["distributed"]["max_failures"] = 1
    spec = ExperimentSpec.model_validate(doc)
    run_id = new_run(mlflow, "kill")
    metrics = run_trainer(spec, run_id="ds-kill", mlflow_uri=ray_on_stack.mlflow_uri, mlflow_run_id=run_id,
                          storage_path=str(tmp_path), log_spec=False)
    assert metrics["step"] == 8
    # The loop logs model/params at the step it starts from: 0, then 3 after the restore.
    starts = sorted(m.step for m in mlflow.get_metric_history(run_id, "model/params"))
    assert starts == [0, 3], starts
    losses = curve(mlflow, run_id)
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    # Each kept checkpoint holds both ranks' ZeRO-3 shards (merged by Ray Train from two folders).
    shards = sorted(p.name for p in tmp_path.glob("orchestra-ds-kill/checkpoint_*/step8/*.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], shards
