"""The DeepSpeed config a spec gives, and the checks of a DeepSpeed spec against the rest of it.

The worker builds its DeepSpeed config with :func:`merged_config`: the values Orchestra derives
from the spec (batch sizes, accumulation, precision, clipping, ZeRO stage and offload), tuned
defaults, and the spec's raw ``distributed.deepspeed.config`` fragment merged over them. A
fragment may add or tune anything else (bucket sizes, prefetching, ...), but a key that the spec
already decides must repeat the spec's value: :func:`check_deepspeed` rejects it otherwise, naming
the key, at validation time (no run starts with a config the spec does not describe).

Two ways to run under DeepSpeed:

- **ZeRO** (the default): DeepSpeed's engine at the requested stage, DeepSpeed's own bf16/fp16,
  the optimizer as a client optimizer (DeepSpeed's fused Adam on GPU, its CPU Adam with
  ``offload_optimizer``, the registry's optimizer otherwise).
- **whole parameters**: optimizers and hooks that need every weight matrix and its gradient whole
  (per-matrix projections: GaLore, DCT, LORENZA; closure optimizers that re-run forward and
  backward: SAM, AdaZo-SAM; PEFT methods that edit gradients or toggle trainable layers between
  backward and step; robust gradient aggregation). DeepSpeed then runs at stage 0 with fp32
  weights (bf16 by torch autocast), which is data parallelism with DeepSpeed's engine and
  checkpoints. Projected optimizers asked for ZeRO stage 1 or 2 get the same memory saving in
  another form: the optimizer state is partitioned across ranks by whole matrices
  (``algorithms.optimizers.partitioned.PartitionedOptimizer``: each rank owns whole parameters,
  updates them and all-gathers the new weights). ZeRO-3 partitions every parameter, so it is
  rejected for all of these.
"""

import copy
from typing import TYPE_CHECKING, Any

from service.spec.derived import needs_robust_exchange
from service.spec.derived import zero_stage as requested_zero_stage

if TYPE_CHECKING:
    from service.spec.model import ExperimentSpec

_NO_STEPS_PRINT = 10**12  # DeepSpeed's own progress print; Orchestra logs to MLflow itself


def gradient_exchange(spec: "ExperimentSpec") -> bool:
    """A robust rule, or simulated Byzantine gradients: needs every rank's whole gradient."""
    return needs_robust_exchange(spec)


def whole_params_reason(spec: "ExperimentSpec") -> str | None:
    """Why this spec needs whole parameters and gradients on every rank, or None."""
    assert spec.optimizer is not None
    reason = spec.optimizer.whole_params_reason()
    if reason is not None:
        return reason
    if spec.peft is not None and spec.peft.EDITS_GRADIENTS:
        return f"peft {spec.peft.name!r} edits gradients or trainable layers between backward and the step"
    if gradient_exchange(spec):
        return "robust gradient aggregation combines every rank's whole gradient"
    return None


def zero_stage(spec: "ExperimentSpec") -> int:
    """The stage the spec asks for (2 when the deepspeed section is left out)."""
    stage = requested_zero_stage(spec)
    assert stage is not None, "a deepspeed spec"
    return stage


def engine_stage(spec: "ExperimentSpec") -> int:
    """The ZeRO stage DeepSpeed's engine runs at (0 in whole-parameter mode)."""
    return 0 if whole_params_reason(spec) else zero_stage(spec)


def partitions_optimizer(spec: "ExperimentSpec") -> bool:
    """Projected optimizer at ZeRO 1/2: state partitioned by whole matrices (PartitionedOptimizer)."""
    assert spec.optimizer is not None
    return spec.optimizer.PROJECTS_MATRICES and zero_stage(spec) in (1, 2)


def deepspeed_precision(spec: "ExperimentSpec") -> str | None:
    """``bf16``/``fp16`` when DeepSpeed's engine does mixed precision; None for fp32 or autocast."""
    assert spec.train is not None
    if spec.train.precision == "fp32" or whole_params_reason(spec):
        return None
    return spec.train.precision


def derived_values(spec: "ExperimentSpec") -> dict[str, Any]:
    """Flattened keys of the generated config that come from the spec (a fragment must agree)."""
    assert spec.train is not None
    n = spec.distributed.num_workers
    train = spec.train
    ds = spec.distributed.deepspeed
    precision = deepspeed_precision(spec)
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // (n * train.grad_accum),
        "gradient_accumulation_steps": train.grad_accum,
        "bf16.enabled": precision == "bf16",
        "bfloat16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization.stage": zero_stage(spec),
        "zero_optimization.offload_optimizer.device": "cpu" if ds is not None and ds.offload_optimizer else "none",
        "zero_optimization.offload_param.device": "cpu" if ds is not None and ds.offload_params else "none",
    }


def generated_config(spec: "ExperimentSpec") -> dict[str, Any]:
    """The DeepSpeed config Orchestra writes for the spec, before the fragment is merged."""
    assert spec.train is not None
    derived = derived_values(spec)
    ds = spec.distributed.deepspeed
    stage = engine_stage(spec)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Overlap the reduction with backward; reduce into one contiguous buffer (less
        # fragmentation); 5e8-element buckets (DeepSpeed's default) suit NVLink and PCIe alike.
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                     "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000})
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
                     "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                     "stage3_gather_16bit_weights_on_model_save": True})
    if ds is not None and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds is not None and ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": derived["train_batch_size"],
        "train_micro_batch_size_per_gpu": derived["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": derived["gradient_accumulation_steps"],
        "gradient_clipping": derived["gradient_clipping"],
        "bf16": {"enabled": derived["bf16.enabled"]},
        "fp16": {"enabled": derived["fp16.enabled"], "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # The optimizer is always a client optimizer built from the spec.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # adamw gets DeepSpeedCPUAdam; others run as given
        "steps_per_print": _NO_STEPS_PRINT,
        "wall_clock_breakdown": False,
    }
    return config


def deep_merge(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """``fragment`` over ``base``: nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merged_config(spec: "ExperimentSpec") -> dict[str, Any]:
    """The config the worker passes to ``deepspeed.initialize``."""
    ds = spec.distributed.deepspeed
    config = deep_merge(generated_config(spec), ds.config if ds is not None else {})
    # A fragment may repeat the requested stage; whole-parameter mode still runs the engine at 0.
    config["zero_optimization"]["stage"] = engine_stage(spec)
    if config.get("bfloat16") is not None and "bf16" in config:
        config["bf16"] = deep_merge(config["bf16"], config.pop("bfloat16"))  # DeepSpeed's alias
    return config


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value
    return out


def _same(key: str, given: Any, derived: Any) -> bool:
    if key.endswith("offload_optimizer.device") or key.endswith("offload_param.device"):
        # "nvme" refines the spec's "offload" just as "cpu" does.
        return (str(given).lower() == "none") == (derived == "none")
    if isinstance(derived, bool):
        return given is derived
    if isinstance(derived, int | float) and isinstance(given, int | float) and not isinstance(given, bool):
        return float(given) == float(derived)
    return bool(given == derived)


_SPEC_OWNED_PREFIXES = {
    "optimizer": "the optimizer comes from the spec's optimizer section",
    "scheduler": "the learning-rate schedule comes from the spec's train section",
    "amp": "precision comes from train.precision",
    "torch_autocast": "precision comes from train.precision",
}


def _check_fragment(spec: "ExperimentSpec") -> None:
    ds = spec.distributed.deepspeed
    if ds is None:
        return
    derived = derived_values(spec)
    for key, value in flatten("", ds.config, {}).items():
        where = f"distributed.deepspeed.config.{key}"
        top = key.split(".")[0]
        if top in _SPEC_OWNED_PREFIXES and not (key.endswith(".enabled") and value is False):
            raise ValueError(f"{where}: {_SPEC_OWNED_PREFIXES[top]}, not from the DeepSpeed config")
        if key in derived and not _same(key, value, derived[key]):
            why = ""
            if key.split(".")[0] in ("bf16", "bfloat16", "fp16") and whole_params_reason(spec):
                why = f" (mixed precision runs under torch autocast here: {whole_params_reason(spec)})"
            raise ValueError(f"{where}: {value!r} disagrees with the spec, which gives {derived[key]!r}{why}")


def check_deepspeed(spec: "ExperimentSpec") -> None:
    """Raise ``ValueError("field.path: reason")`` when the DeepSpeed spec cannot run as written."""
    assert spec.train is not None and spec.optimizer is not None
    dist = spec.distributed
    n = dist.num_workers
    if spec.train.batch_size % (n * spec.train.grad_accum):
        raise ValueError(
            f"train.batch_size: {spec.train.batch_size} must be divisible by num_workers x grad_accum "
            f"({n} x {spec.train.grad_accum}) for deepspeed"
        )
    ds = dist.deepspeed
    stage = zero_stage(spec)
    offload = ds is not None and (ds.offload_optimizer or ds.offload_params)
    if ds is not None and ds.offload_params and stage != 3:
        raise ValueError("distributed.deepspeed.offload_params: needs zero_stage 3")
    if ds is not None and ds.offload_optimizer and stage == 0:
        raise ValueError("distributed.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3")
    if offload and not dist.use_gpu:
        raise ValueError("distributed.deepspeed.offload_optimizer: CPU offload needs distributed.use_gpu "
                         "(on CPU workers there is no device memory to relieve)")
    if spec.peft is not None and stage == 3:
        raise ValueError(
            f"distributed.deepspeed.zero_stage: peft {spec.peft.name!r} needs whole weight matrices (adapters "
            "wrap them, and the adapter is saved from them); ZeRO-3 partitions every parameter: use zero_stage 0-2"
        )
    reason = whole_params_reason(spec)
    if reason is not None:
        projected = spec.optimizer.PROJECTS_MATRICES
        allowed = spec.optimizer.zero_stages() if projected else (0,)
        if stage not in allowed:
            works = "0, 1 or 2 (1 and 2 partition the optimizer state by whole matrices)" if projected else "0"
            raise ValueError(
                f"distributed.deepspeed.zero_stage: {reason}, but ZeRO stage {stage} splits parameters and "
                f"gradients across ranks: use zero_stage {works}, or strategy ddp"
            )
        if spec.train.precision == "fp16":
            raise ValueError(
                f"train.precision: fp16 under deepspeed needs DeepSpeed's loss-scaling optimizer, which flattens "
                f"the parameters; {reason}: use bf16 (torch autocast) or fp32"
            )
        if offload:
            raise ValueError(f"distributed.deepspeed.offload_optimizer: {reason}, so DeepSpeed runs at stage 0, "
                             "which does not offload")
    _check_fragment(spec)
