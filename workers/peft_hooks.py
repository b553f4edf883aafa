"""The worker's side of PEFT: apply the spec's method to the task's model and feed the data-driven
initialisations (EVA, CorDA, LoRA-SB, OwLore). Whether the method fits the run's strategy is the
spec's business (its configs' rules, checked at submission).

``apply_peft(spec, model, task)`` returns ``(model, handle)``; the loop then calls the handle's
hooks (``algorithms/peft/base.py`` documents the order) and ``workers.model_io.save_final_model``
writes the adapter.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from service.spec import ExperimentSpec


def model_inputs(task: Any, batch: Any) -> dict[str, Any]:
    """A task batch as keyword arguments of an HF model (with ``labels``, so ``.loss`` is set)."""
    convert = getattr(task, "model_inputs", None)
    if convert is not None:
        return convert(batch)  # type: ignore[no-any-return]
    if isinstance(batch, tuple) and len(batch) == 1:  # token windows (CharLMTask)
        return {"input_ids": batch[0], "labels": batch[0]}
    if isinstance(batch, dict):  # a custom task whose samples are the model's keyword arguments
        return batch
    raise ValueError(f"task {type(task).__name__} has no model_inputs() for PEFT initialisation")


def init_batches(spec: ExperimentSpec, task: Any, n: int) -> list[dict[str, Any]]:
    """``n`` training batches for a data-driven init: the same on every rank (rank 0's shard of a
    one-worker split, fixed seed), so that every worker starts from the same adapter."""
    assert spec.train is not None
    stream = task.batches(rank=0, world=1, batch_size=init_batch_size(spec), seed=spec.train.seed + 7919)
    return [model_inputs(task, b) for b in itertools.islice(stream, n)]


def init_batch_size(spec: ExperimentSpec) -> int:
    """Samples per init batch: one worker's micro-batch."""
    assert spec.train is not None
    return max(1, spec.train.batch_size // (spec.distributed.num_workers * spec.train.grad_accum))


def init_device(spec: ExperimentSpec) -> torch.device:
    """Where a data-driven initialisation runs: the worker's GPU when it has one (an SVD of every
    layer's gradient or inputs on CPU would take minutes for a large model), else the CPU."""
    if spec.distributed.use_gpu and torch.cuda.is_available():
        try:
            from ray.train.torch import get_device

            return torch.device(get_device())
        except Exception:  # not inside a Ray Train worker
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peft_task_type(spec: ExperimentSpec, model: nn.Module) -> str | None:
    """The task kind PEFT is told: the spec's, or for a custom task what its transformers model is
    (a causal LM, a sequence classifier, or neither: adapters on the named modules only)."""
    if spec.task.kind != "custom":
        return spec.task.kind
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"peft.name: PEFT applies to a transformers model; the custom task's model() returned "
                        f"{type(model).__name__}")
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "causal_lm"
    return "seq_classification" if name.endswith("ForSequenceClassification") else None


def apply_peft(spec: ExperimentSpec, model: nn.Module, task: Any) -> tuple[nn.Module, Any]:
    from algorithms.peft.registry import PEFT

    cfg = spec.peft
    assert cfg is not None
    n_init = cfg.init_batches_needed(init_batch_size(spec))
    batches = None
    if n_init:
        device = init_device(spec)
        model.to(device)  # the loop moves it there next anyway
        batches = [{k: v.to(device) for k, v in b.items()} for b in init_batches(spec, task, n_init)]
    handle = PEFT.build(cfg, model, batches, task_type=peft_task_type(spec, model))
    return handle.model, handle
