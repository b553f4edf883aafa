"""The DeepSpeed config a spec generates, the fragment merged over it, and what validation rejects.

Config checks need no DeepSpeed; the last test feeds a generated config to DeepSpeed's own config
parser (``DeepSpeedConfig``), so a key we write that DeepSpeed does not read, or a batch triple it
finds inconsistent, fails here rather than on a cluster.
"""

import copy
import json
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
    spec = parse(ds_spec(stage=2, optimizer={"name": "galore", "lr": 1e-3}))
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
