"""DeepSpeed's engine in one process (gloo, world of 1), driven as the training loop drives it
(the loop's forward_backward closure, the DeepSpeed strategy's step) against plain torch; the
checkpoint round trip. These run
DeepSpeed itself (its engine, ZeRO stages 0-3 on CPU), so they live with the integration tests.
"""

import os
from typing import Any

import pytest

from service.spec import parse_spec

pytestmark = [pytest.mark.integration]


def parse(doc: dict[str, Any]):  # type: ignore[no-untyped-def]
    import json

    return parse_spec(json.dumps(doc))


# ---- the engine in one process (gloo, world of 1): the loop's calls against plain torch -----------


def mlp_spec(*, stage: int, optimizer: dict[str, Any], accum: int = 2, clip: float | None = 0.05,
             **train: Any) -> dict[str, Any]:
    return {
        "name": "ds-engine",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [16]}},
        "train": {"max_steps": 10, "batch_size": 4 * accum, "grad_accum": accum, "seed": 0,
                  **({"grad_clip": clip} if clip else {}), **train},
        "optimizer": optimizer,
        "distributed": {"num_workers": 1, "strategy": "deepspeed", "deepspeed": {"zero_stage": stage}},
    }


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what a launcher (or Ray Train) sets
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Run:
    """The training loop's use of the DeepSpeed strategy: its forward_backward closure over the
    micro-batches, then the strategy's step (the engine's step and the schedule)."""

    def __init__(self, doc: dict[str, Any], seed: int = 0) -> None:
        import torch

        from workers.plan import RunPlan
        from workers.strategy.deepspeed import DeepSpeedStrategy
        from workers.tasks import build_task

        self.spec = parse(doc)
        self.task = build_task(self.spec)
        torch.manual_seed(seed)
        self.reference = self.task.build_model()
        import copy as _copy

        self.engine = DeepSpeedStrategy(self.spec, RunPlan.from_spec(self.spec), _copy.deepcopy(self.reference),
                                        torch.device("cpu"), exchange=None)
        self.batches = self.task.batches(rank=0, world=1, batch_size=4, seed=0)
        self.steps = 0

    def step(self) -> float:
        from functools import partial

        from workers.faults import Straggler
        from workers.train_loop import NoPeft, forward_backward

        train = self.spec.train
        assert train is not None
        micro = [next(self.batches) for _ in range(train.grad_accum)]
        closure = partial(forward_backward, self.engine, self.task, micro, step=self.steps, hooks=NoPeft(),
                          straggler=Straggler(self.spec.faults, 0, 1))
        loss, _ = self.engine.step(closure, self.steps)
        self.steps += 1
        self.last_micro = micro
        return float(loss)

    def weights(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.engine.final_model().state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_steps_like_plain_torch(process_group, stage: int) -> None:  # type: ignore[no-untyped-def]
    """Accumulation over 2 micro-batches, clipping to 0.05 and SGD with momentum, 3 steps: the same
    weights as torch alone (ZeRO-3's are gathered by final_model)."""
    import torch

    run = Run(mlp_spec(stage=stage, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}))
    ref = run.reference
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    norms = []
    for _ in range(3):
        run.step()
        opt.zero_grad()
        for batch in run.last_micro:
            (run.task.loss(ref, batch) / 2).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        opt.step()
    assert min(norms) > 0.05  # clipping was active on every step
    got = run.weights()
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_closure_optimizer_gets_the_loop_closure(process_group) -> None:  # type: ignore[no-untyped-def]
    """SAM (two forward-backward passes per step) runs in whole-parameter mode: DeepSpeed's engine
    at stage 0, the optimizer calling the loop's closure itself; equal to SAM on a plain model."""
    import torch

    from algorithms.optimizers.registry import build

    cfg = {"name": "sam", "lr": 0.1, "rho": 0.05, "momentum": 0.9}
    run = Run(mlp_spec(stage=0, optimizer=cfg, clip=None))
    assert run.engine.needs_closure and run.engine.stage == 0
    ref = run.reference
    opt = build("sam", ref.parameters(), **{k: v for k, v in cfg.items() if k != "name"})
    for _ in range(3):
        run.step()

        def closure(backward: bool = True) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for batch in run.last_micro:
                loss = run.task.loss(ref, batch) / 2
                if backward:
                    loss.backward()
                total += loss.detach()
            return total

        opt.step(closure)  # type: ignore[arg-type]
    got = run.weights()
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("stage", "optimizer"), [
    (2, {"name": "adamw", "lr": 0.01}),
    (3, {"name": "adamw", "lr": 0.01}),
    (2, {"name": "galore", "lr": 0.01, "rank": 4, "update_proj_gap": 2}),  # PartitionedOptimizer, per-rank file
])
def test_checkpoint_restores_the_exact_state(process_group, tmp_path, monkeypatch, stage: int,  # type: ignore[no-untyped-def]
                                             optimizer: dict[str, Any]) -> None:
    """Save after 2 steps, go on 2 steps; a new engine (other initial weights) restored from the
    checkpoint, 2 steps on the same batches: the same weights and learning rate (model, optimizer
    state, schedule, step all restored)."""
    import shutil

    import ray.train
    import torch

    saved = tmp_path / "ckpt"
    reported: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        shutil.copytree(checkpoint.path, saved)
        reported.append(metrics)

    monkeypatch.setattr(ray.train, "report", report)
    doc = mlp_spec(stage=stage, optimizer=optimizer, warmup_steps=6, schedule="cosine")
    first = Run(doc)
    assert first.engine.partitioned == (optimizer["name"] == "galore")
    for _ in range(2):
        first.step()
    first.engine.save(step=2, metrics={})
    assert reported == [{"step": 2}]
    for _ in range(2):
        first.step()

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(saved)))
    second = Run(doc, seed=123)
    assert second.engine.restore() == 2
    for _ in range(2):
        next(second.batches)  # the first run's two steps (2 micro-batches each) before the save
        next(second.batches)
    for _ in range(2):
        second.step()
    assert second.engine.scheduler.get_last_lr() == first.engine.scheduler.get_last_lr()
    want, got = first.weights(), second.weights()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
