"""The ddp and DeepSpeed strategies on two ranks (gloo, spawned with torch.multiprocessing; Ray and
MLflow faked), each run through the real ``train_worker``: DDP's all-reduce (with no_sync over the
micro-batches), the robust exchange in both layouts (the rule ``trimmed_mean`` with f = 0 is the
mean, so every run must end with the same weights), and DeepSpeed with its all-reduce, or with it
turned off exactly when the exchange is handed to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.spec import ExperimentSpec
from tests.unit.workers.harness import run_ranks

MEAN_AS_RULE = {"name": "trimmed_mean", "f": 0}
CASES: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp"},
    "ddp-gather": {"strategy": "ddp", "aggregator": MEAN_AS_RULE},
    "ddp-shard": {"strategy": "ddp", "aggregator": MEAN_AS_RULE, "exchange": "shard"},
    "zero1": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}},
    "zero0-shard": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 0}, "aggregator": MEAN_AS_RULE},
}


def spec_doc(distributed: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "strategies-unit",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [16]}},
        "train": {"max_steps": 3, "batch_size": 16, "grad_accum": 2, "seed": 1, "grad_clip": 0.2,
                  "log_every": 1, "eval_batches": 1},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "distributed": {"num_workers": 2, **distributed},
    }


def _rank(rank: int, world: int, out: str) -> dict[str, Any]:
    from tests.unit.workers.harness import final_state, run_worker

    results: dict[str, Any] = {}
    for key, distributed in CASES.items():
        spec = ExperimentSpec.model_validate(spec_doc(distributed))
        try:
            log, _ = run_worker(spec, Path(out) / f"rank{rank}", run_id=key, rank=rank, world=world)
        except Exception as exc:
            raise RuntimeError(f"{key}: {exc!r}") from exc
        if rank == 0:
            state = {k: v.numpy() for k, v in final_state(Path(out) / "rank0", key).items()}
            results[key] = (state, sorted(log.metric_log))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    return run_ranks(_rank, 2, str(tmp_path_factory.mktemp("strategies")))[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("key", [k for k in CASES if k != "ddp"])
def test_every_strategy_and_exchange_ends_with_ddps_weights(runs: dict[str, Any], key: str) -> None:
    want, _ = runs["ddp"]
    got, metrics = runs[key]
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{key}: {name}")
    exchanged = "aggregator" in CASES[key]
    assert ("exchange/rule_ms" in metrics) == exchanged, metrics


def test_the_runs_differ_from_the_initial_weights(runs: dict[str, Any]) -> None:
    """The comparison can fail: training moved the weights away from where they started."""
    from workers.tasks import build_task

    spec = ExperimentSpec.model_validate(spec_doc({"strategy": "ddp"}))
    torch.manual_seed(1)
    initial = build_task(spec).build_model().state_dict()
    trained, _ = runs["ddp"]
    assert any(np.abs(trained[k] - initial[k].numpy()).max() > 1e-3 for k in initial)
