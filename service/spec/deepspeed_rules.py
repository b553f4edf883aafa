"""Checks of a DeepSpeed spec against the rest of the spec (micro-batch, accumulation, precision)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.spec.model import ExperimentSpec

# Keys that Orchestra derives from the spec; a raw fragment may repeat them only with equal values.
_DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def derived_values(spec: "ExperimentSpec") -> dict[str, Any]:
    assert spec.train is not None
    n = spec.distributed.num_workers
    train = spec.train
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // (n * train.grad_accum),
        "gradient_accumulation_steps": train.grad_accum,
        "bf16.enabled": train.precision == "bf16",
        "fp16.enabled": train.precision == "fp16",
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization.stage": spec.distributed.deepspeed.zero_stage if spec.distributed.deepspeed else 2,
    }


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def check_deepspeed(spec: "ExperimentSpec") -> None:
    assert spec.train is not None
    n = spec.distributed.num_workers
    if spec.train.batch_size % (n * spec.train.grad_accum):
        raise ValueError(
            f"train.batch_size: {spec.train.batch_size} must be divisible by num_workers x grad_accum "
            f"({n} x {spec.train.grad_accum}) for deepspeed"
        )
    ds = spec.distributed.deepspeed
    if ds is None:
        return
    if ds.offload_params and ds.zero_stage != 3:
        raise ValueError("distributed.deepspeed.offload_params: needs zero_stage 3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError("distributed.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3")
    flat: dict[str, Any] = {}
    _flatten("", ds.config, flat)
    derived = derived_values(spec)
    for key, value in flat.items():
        if key in derived and value != derived[key] and not (key == "gradient_clipping" and value == 0):
            raise ValueError(
                f"distributed.deepspeed.config.{key}: {value!r} disagrees with the spec, which gives {derived[key]!r}"
            )
        if key.startswith("optimizer") or key.startswith("scheduler"):
            raise ValueError(
                f"distributed.deepspeed.config.{key}: the optimizer and schedule come from the spec's optimizer and "
                "train sections"
            )
