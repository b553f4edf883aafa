"""The DeepSpeed config a spec generates, the fragment merged over it, and what validation rejects.

Config checks need no DeepSpeed; the last test feeds a generated config to DeepSpeed's own config
parser (``DeepSpeedConfig``), so a key we write that DeepSpeed does not read, or a batch triple it
finds inconsistent, fails here rather than on a cluster.
"""

import copy
import json
import os
from typing import Any

import pytest

from service.spec import SpecError, parse_spec
from service.spec.deepspeed_rules import (
    engine_stage,
    generated_config,
    merged_config,
    partitions_optimizer,
    whole_params_reason,
)


def ds_spec(*, stage: int = 2, workers: int = 4, batch: int = 64, accum: int = 2, precision: str = "bf16",
            clip: float | None = 1.0, optimizer: dict[str, Any] | None = None, use_gpu: bool = True,
            **deepspeed: Any) -> dict[str, Any]:
    return {
        "name": "ds-unit",
        "task": {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": 64},
                 "model": {"name": "llama", "hidden": 64, "layers": 2, "heads": 4}},
        "train": {"max_steps": 10, "batch_size": batch, "grad_accum": accum, "precision": precision,
                  **({"grad_clip": clip} if clip else {})},
        "optimizer": optimizer or {"name": "adamw", "lr": 1e-3},
        "distributed": {"num_workers": workers, "use_gpu": use_gpu, "strategy": "deepspeed",
                        "deepspeed": {"zero_stage": stage, **deepspeed}},
    }


def parse(doc: dict[str, Any]):  # type: ignore[no-untyped-def]
    return parse_spec(json.dumps(doc))


def rejected(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse(doc)
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


# ---- the generated config --------------------------------------------------------------------


@pytest.mark.parametrize(("workers", "batch", "accum", "micro"), [(1, 8, 1, 8), (2, 64, 2, 16), (8, 256, 4, 8),
                                                                  (3, 48, 1, 16)])
def test_batch_triple_comes_from_the_spec(workers: int, batch: int, accum: int, micro: int) -> None:
    cfg = generated_config(parse(ds_spec(workers=workers, batch=batch, accum=accum)))
    assert cfg["train_batch_size"] == batch
    assert cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    # DeepSpeed's own consistency rule: global = micro x accumulation x data-parallel ranks.
    assert cfg["train_micro_batch_size_per_gpu"] * accum * workers == batch


@pytest.mark.parametrize(("precision", "bf16", "fp16"), [("bf16", True, False), ("fp16", False, True),
                                                         ("fp32", False, False)])
def test_precision_and_clipping(precision: str, bf16: bool, fp16: bool) -> None:
    cfg = generated_config(parse(ds_spec(precision=precision, clip=0.5)))
    assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (bf16, fp16)
    assert cfg["gradient_clipping"] == 0.5
    assert generated_config(parse(ds_spec(clip=None)))["gradient_clipping"] == 0.0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_and_offload(stage: int) -> None:
    cfg = generated_config(parse(ds_spec(stage=stage)))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    if stage >= 1:
        assert zero["overlap_comm"] and zero["contiguous_gradients"]


def test_offload_sections() -> None:
    zero = generated_config(parse(ds_spec(stage=3, offload_optimizer=True, offload_params=True)))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    zero = generated_config(parse(ds_spec(stage=2, offload_optimizer=True)))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero


def test_fragment_merges_over_the_generated_config() -> None:
    fragment = {"zero_optimization": {"reduce_bucket_size": 12345, "stage": 2},
                "bf16": {"enabled": True, "immediate_grad_update": True}, "wall_clock_breakdown": True,
                "train_batch_size": 64}
    spec = parse(ds_spec(config=fragment))
    cfg = merged_config(spec)
    base = generated_config(spec)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 12345
    # keys the fragment does not name keep the generated values, nested ones too
    assert cfg["zero_optimization"]["overlap_comm"] == base["zero_optimization"]["overlap_comm"]
    assert cfg["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert cfg["wall_clock_breakdown"] is True
    # the merge does not change the generated config or the spec's fragment
    assert generated_config(spec) == base
    assert spec.distributed.deepspeed is not None and spec.distributed.deepspeed.config == fragment


def test_bfloat16_alias_is_merged_into_bf16() -> None:
    cfg = merged_config(parse(ds_spec(config={"bfloat16": {"enabled": True, "check_grad_overflow": True}})))
    assert "bfloat16" not in cfg and cfg["bf16"] == {"enabled": True, "check_grad_overflow": True}


def test_missing_deepspeed_section_means_zero_2() -> None:
    doc = ds_spec()
    del doc["distributed"]["deepspeed"]
    assert generated_config(parse(doc))["zero_optimization"]["stage"] == 2


# ---- a fragment that disagrees with the spec is rejected, naming the key ------------------------

DISAGREE = [
    ({"train_batch_size": 128}, "train_batch_size", "64"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", "8"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "2"),
    ({"bf16": {"enabled": False}}, "bf16.enabled", "True"),
    ({"bfloat16": {"enabled": False}}, "bfloat16.enabled", "True"),
    ({"fp16": {"enabled": True}}, "fp16.enabled", "False"),
    ({"gradient_clipping": 0.0}, "gradient_clipping", "1.0"),
    ({"gradient_clipping": 2.0}, "gradient_clipping", "1.0"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "2"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer.device",
     "none"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, "optimizer.type", "optimizer section"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler.type", "train section"),
    ({"torch_autocast": {"enabled": True}}, "torch_autocast.enabled", "train.precision"),
]


@pytest.mark.parametrize(("fragment", "key", "says"), DISAGREE, ids=[d[1] for d in DISAGREE])
def test_disagreeing_fragment_is_rejected(fragment: dict[str, Any], key: str, says: str) -> None:
    err = rejected(ds_spec(workers=4, batch=64, accum=2, config=fragment))
    assert err["field"] == f"distributed.deepspeed.config.{key}"
    assert says in err["message"]


def test_agreeing_fragment_is_accepted() -> None:
    fragment = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
                "bf16": {"enabled": True}, "fp16": {"enabled": False}, "gradient_clipping": 1,
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}},
                "torch_autocast": {"enabled": False}}
    assert merged_config(parse(ds_spec(config=fragment)))["train_batch_size"] == 64
    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/local"}}}
    assert merged_config(parse(ds_spec(offload_optimizer=True, config=nvme)))[
        "zero_optimization"]["offload_optimizer"]["device"] == "nvme"


# ---- combinations that cannot work ---------------------------------------------------------------

BAD = [
    ("offload params below stage 3", ds_spec(stage=2, offload_params=True), "distributed.deepspeed.offload_params",
     "zero_stage 3"),
    ("offload optimizer at stage 0", ds_spec(stage=0, offload_optimizer=True),
     "distributed.deepspeed.offload_optimizer", "zero_stage 1"),
    ("offload on CPU workers", ds_spec(stage=2, offload_optimizer=True, use_gpu=False, precision="fp32"),
     "distributed.deepspeed.offload_optimizer", "use_gpu"),
    ("batch not divisible", ds_spec(workers=3, batch=64, accum=2), "train.batch_size", "divisible"),
    ("galore under ZeRO-3", ds_spec(stage=3, optimizer={"name": "galore", "lr": 1e-3}),
     "distributed.deepspeed.zero_stage", "0, 1 or 2"),
    ("dct under ZeRO-3", ds_spec(stage=3, optimizer={"name": "dct", "lr": 1e-3}),
     "distributed.deepspeed.zero_stage", "whole"),
    ("sam under ZeRO-1", ds_spec(stage=1, optimizer={"name": "sam", "lr": 1e-3}),
     "distributed.deepspeed.zero_stage", "use zero_stage 0"),
    ("adazo_sam under ZeRO-2", ds_spec(stage=2, optimizer={"name": "adazo_sam", "lr": 1e-3}),
     "distributed.deepspeed.zero_stage", "re-runs forward"),
    ("projected optimizer in fp16", ds_spec(stage=0, precision="fp16", optimizer={"name": "galore", "lr": 1e-3}),
     "train.precision", "bf16"),
    ("projected optimizer and bf16 fragment", ds_spec(stage=0, optimizer={"name": "galore", "lr": 1e-3},
                                                      config={"bf16": {"enabled": True}}),
     "distributed.deepspeed.config.bf16.enabled", "autocast"),
]


@pytest.mark.parametrize(("doc", "field", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_impossible_combination_is_rejected(doc: dict[str, Any], field: str, message: str) -> None:
    err = rejected(doc)
    assert err["field"] == field and message in err["message"], err


def test_peft_and_robust_aggregation_rules() -> None:
    lora = ds_spec(stage=3)
    lora["peft"] = {"name": "lora", "r": 4}
    err = rejected(lora)
    assert err["field"] == "distributed.deepspeed.zero_stage" and "ZeRO-3" in err["message"]
    lora["distributed"]["deepspeed"]["zero_stage"] = 2
    assert whole_params_reason(parse(lora)) is None  # plain LoRA runs under ZeRO-2 as is
    pro = copy.deepcopy(lora)
    pro["peft"] = {"name": "lora_pro", "r": 4}
    assert "lora_pro" in rejected(pro)["message"]
    pro["distributed"]["deepspeed"]["zero_stage"] = 0  # the gradient-editing methods need ddp (peft's own rule)
    assert rejected(pro)["field"] == "peft.name"
    robust = ds_spec(stage=2, workers=4)
    robust["distributed"]["aggregator"] = {"name": "median"}
    assert "aggregation" in rejected(robust)["message"]
    robust["distributed"]["deepspeed"]["zero_stage"] = 0
    assert whole_params_reason(parse(robust)) is not None


def test_whole_parameter_mode_runs_the_engine_at_stage_0_without_deepspeed_precision() -> None:
    spec = parse(ds_spec(stage=0, optimizer={"name": "sam", "lr": 1e-3}))
    cfg = merged_config(spec)
    assert cfg["zero_optimization"]["stage"] == 0
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]  # bf16 by torch autocast instead
    assert not partitions_optimizer(spec)


def test_projected_optimizer_at_zero_2_is_partitioned_by_whole_matrices() -> None:
    # The optimizer config decides whether it accepts stages 1/2 (its own check_distributed);
    # when it does, the engine runs at stage 0 with the PartitionedOptimizer wrapper.
    doc = ds_spec(stage=2, optimizer={"name": "galore", "lr": 1e-3})
    try:
        spec = parse(doc)
    except SpecError as exc:
        pytest.skip(f"the optimizer family does not accept ZeRO-2 yet: {exc}")
    assert partitions_optimizer(spec) and engine_stage(spec) == 0
    assert merged_config(spec)["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_parses_the_generated_config(stage: int) -> None:
    """DeepSpeed's own parser accepts the config (batch triple, sections, field names)."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    spec = parse(ds_spec(stage=stage, workers=1, batch=16, accum=2, precision="fp32",
                         config={"zero_optimization": {"reduce_bucket_size": 1000}}))
    parsed = ds_config.DeepSpeedConfig(merged_config(spec), mpu=None)
    assert parsed.train_batch_size == 16 and parsed.gradient_accumulation_steps == 2
    assert parsed.train_micro_batch_size_per_gpu == 8
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 1.0
    assert parsed.zero_config.reduce_bucket_size == 1000


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


def test_memory_estimate_turns_activation_checkpointing_on_only_when_needed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    from workers.plan import RunPlan
    from workers.strategy.deepspeed import memory_estimate
    from workers.tasks import build_task

    def estimate(spec: Any, device: Any) -> Any:
        return memory_estimate(spec, RunPlan.from_spec(spec).zero_stage, model, device)

    free = 10 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    gpu = torch.device("cuda", 0)
    doc = ds_spec(stage=0, workers=2, batch=16, accum=1)  # micro-batch 8, seq 64, hidden 64, 2 layers
    model = build_task(parse(doc)).build_model()
    n = sum(p.numel() for p in model.parameters())
    activations = 34 * 64 * 8 * 64 * 2 + 6 * 64 * 8 * 256
    expected = {0: 16 * n, 1: 4 * n + 12 * n / 2, 2: 2 * n + 14 * n / 2, 3: 16 * n / 2}
    for stage, states in expected.items():
        doc["distributed"]["deepspeed"]["zero_stage"] = stage
        need, have = estimate(parse(doc), gpu)
        assert need == pytest.approx(states + activations) and have == free
    doc["distributed"]["deepspeed"].update(zero_stage=3, offload_optimizer=True, offload_params=True)
    need, _ = estimate(parse(doc), gpu)
    assert need == pytest.approx(2 * n / 2 + activations)  # only the bf16 gradient shard stays on the GPU
    assert estimate(parse(doc), torch.device("cpu")) is None
