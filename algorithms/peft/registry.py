"""Registry of PEFT methods: name -> builder, plus ``apply`` and ``apply_from_config``.

Each builder takes the model and the method's hyperparameters (the fields of its config model
in ``config.py``, less ``name``) and returns a :class:`~algorithms.peft.base.PeftHandle`.
Methods that initialise from data (EVA, CorDA, LoRA-SB, OwLore) also receive ``batches`` and,
where a loss is needed, ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from algorithms.peft.allora import apply_allora
from algorithms.peft.base import InitBatches, LossFn, PeftHandle, default_loss_fn
from algorithms.peft.config import PeftConfig
from algorithms.peft.ggpo import apply_lora_ggpo
from algorithms.peft.layerwise import apply_lisa, apply_owlore
from algorithms.peft.lora import apply_corda, apply_eva, apply_lora
from algorithms.peft.lora_pro import apply_lora_pro
from algorithms.peft.lora_sb import apply_lora_sb


@dataclass(frozen=True)
class Method:
    builder: Callable[..., PeftHandle]
    uses_batches: bool = False
    uses_loss: bool = False


_REGISTRY: dict[str, Method] = {}


def register(name: str, builder: Callable[..., PeftHandle], *, uses_batches: bool = False,
             uses_loss: bool = False) -> None:
    """Add a method; a name registered twice is an error."""
    if name in _REGISTRY:
        raise ValueError(f"PEFT method {name!r} is already registered")
    _REGISTRY[name] = Method(builder, uses_batches, uses_loss)


def known() -> list[str]:
    return sorted(_REGISTRY)


def build(
    name: str,
    model: nn.Module,
    *,
    batches: InitBatches = None,
    loss_fn: LossFn = default_loss_fn,
    **hparams: Any,
) -> PeftHandle:
    """Apply method ``name`` to ``model``; unknown names are refused with the list of known ones.

    ``batches``: training batches for the data-driven initialisations (the hyperparameter
    ``init_batches`` says how many of them are used)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown PEFT method {name!r}; known: {', '.join(known())}")
    method = _REGISTRY[name]
    extra: dict[str, Any] = {}
    if method.uses_batches:
        extra["batches"] = batches
    if method.uses_loss:
        extra["loss_fn"] = loss_fn
    return method.builder(model, **hparams, **extra)


def apply(name: str, model: nn.Module, **hparams: Any) -> PeftHandle:
    """``apply("lora", model, r=8, task_type="seq_classification")``; ``apply("eva", model,
    init_batches=2, batches=loader)`` for the data-driven ones."""
    return build(name, model, **hparams)


def apply_from_config(
    cfg: PeftConfig,
    model: nn.Module,
    init_batches: InitBatches = None,
    *,
    task_type: str | None = None,
    loss_fn: LossFn = default_loss_fn,
) -> PeftHandle:
    """Build from a validated config (``config.PeftConfig``); ``task_type`` is the run's task
    ("seq_classification" or "causal_lm"), which tells peft which head to keep trainable."""
    hparams = cfg.model_dump(exclude={"name"})
    return build(
        cfg.name, model, batches=init_batches, loss_fn=loss_fn, task_type=task_type, **hparams
    )


register("lora", apply_lora)
register("eva", apply_eva, uses_batches=True)
register("corda", apply_corda, uses_batches=True)
register("lora_ggpo", apply_lora_ggpo)
register("lora_pro", apply_lora_pro)
register("allora", apply_allora)
register("lora_sb", apply_lora_sb, uses_batches=True, uses_loss=True)
register("lisa", apply_lisa)
register("owlore", apply_owlore, uses_batches=True)
