"""The worker's side of PEFT: apply the spec's method to the task's model, check that it fits the
run's strategy, and feed the data-driven initialisations (EVA, CorDA, LoRA-SB, OwLore).

``apply_peft(spec, model, task)`` returns ``(model, handle)``; the loop then calls the handle's
hooks (``algorithms/peft/base.py`` documents the order) and ``workers.model_io.save_final_model``
writes the adapter.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from service.spec import ExperimentSpec

# Methods whose hooks read or rewrite full weights or gradients of single tensors: DeepSpeed
# partitions those (ZeRO) or owns the optimizer step, so they run under strategy ddp only.
DEEPSPEED_OK = {"lora", "eva", "corda", "lora_sb"}
# Methods that change which parameters require gradients while training: DDP fixes that set
# when it wraps the model, so they run on one worker.
SINGLE_WORKER = {"lisa", "owlore"}


def check_strategy(spec: ExperimentSpec) -> None:
    """A clear error for a method that cannot run with the spec's strategy (before any work)."""
    assert spec.peft is not None
    name, dist = spec.peft.name, spec.distributed
    if dist.strategy == "deepspeed" and name not in DEEPSPEED_OK:
        raise ValueError(f"peft.name: {name!r} needs strategy ddp (with deepspeed use one of "
                         f"{', '.join(sorted(DEEPSPEED_OK))})")
    if name in SINGLE_WORKER and dist.num_workers > 1:
        raise ValueError(f"peft.name: {name!r} changes the trainable layers as it trains, which DDP "
                         "does not allow: use num_workers 1")


def model_inputs(task: Any, batch: Any) -> dict[str, Any]:
    """A task batch as keyword arguments of an HF model (with ``labels``, so ``.loss`` is set)."""
    convert = getattr(task, "model_inputs", None)
    if convert is not None:
        return convert(batch)  # type: ignore[no-any-return]
    if isinstance(batch, tuple) and len(batch) == 1:  # token windows (CharLMTask)
        return {"input_ids": batch[0], "labels": batch[0]}
    raise ValueError(f"task {type(task).__name__} has no model_inputs() for PEFT initialisation")


def init_batches(spec: ExperimentSpec, task: Any, n: int) -> list[dict[str, Any]]:
    """``n`` training batches for a data-driven init: the same on every rank (rank 0's shard of a
    one-worker split, fixed seed), so that every worker starts from the same adapter."""
    assert spec.train is not None
    per = max(1, spec.train.batch_size // (spec.distributed.num_workers * spec.train.grad_accum))
    stream = task.batches(rank=0, world=1, batch_size=per, seed=spec.train.seed + 7919)
    return [model_inputs(task, b) for b in itertools.islice(stream, n)]


def apply_peft(spec: ExperimentSpec, model: nn.Module, task: Any) -> tuple[nn.Module, Any]:
    from algorithms.peft.registry import apply_from_config

    cfg = spec.peft
    assert cfg is not None
    check_strategy(spec)
    n_init = int(getattr(cfg, "init_batches", 0) or 0)
    batches = init_batches(spec, task, n_init) if n_init else None
    handle = apply_from_config(cfg, model, batches, task_type=spec.task.kind)
    return handle.model, handle
