"""Registry of PEFT methods: config class -> builder of a :class:`~algorithms.peft.base.PeftHandle`.

``PEFT.build(cfg, model, batches, task_type=..., loss_fn=...)`` applies the spec's validated
method to ``model``; ``apply(name, model, **fields)`` does the same from a name and fields
(validated once, by the config). ``batches`` are training batches for the data-driven
initialisations (how many a method reads is its config's ``init_batches_needed``); ``task_type``
is the run's task ("seq_classification" or "causal_lm"), which tells peft which head to keep
trainable; ``loss_fn(model, batch)`` is the loss of LoRA-SB's gradient estimate. Builders pass
the config's fields on: defaults and bounds live in ``config.py``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from algorithms.peft import config as C
from algorithms.peft.allora import apply_allora
from algorithms.peft.base import InitBatches, LossFn, PeftHandle, default_loss_fn
from algorithms.peft.ggpo import apply_lora_ggpo
from algorithms.peft.layerwise import apply_lisa, apply_owlore
from algorithms.peft.lora import apply_corda, apply_eva, apply_lora
from algorithms.peft.lora_pro import apply_lora_pro
from algorithms.peft.lora_sb import apply_lora_sb
from algorithms.registry import Registry, fields_of

PEFT: Registry[C.PeftBase, PeftHandle] = Registry("PEFT method", C.PeftBase)
names = PEFT.names


def apply(name: str, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
          loss_fn: LossFn = default_loss_fn, **fields: Any) -> PeftHandle:
    """``apply("lora", model, r=8, task_type="seq_classification")``; ``apply("eva", model,
    batches=loader, init_batches=2)`` for the data-driven ones."""
    return PEFT.build(PEFT.config(name, **fields), model, batches, task_type=task_type, loss_fn=loss_fn)


@PEFT.register(C.LoRAConfig)
def _lora(cfg: C.LoRAConfig, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
          loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_lora(model, **fields_of(cfg), task_type=task_type)


@PEFT.register(C.EVAConfig)
def _eva(cfg: C.EVAConfig, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
         loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_eva(model, **fields_of(cfg), batches=batches, task_type=task_type)


@PEFT.register(C.CorDAConfig)
def _corda(cfg: C.CorDAConfig, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
           loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_corda(model, **fields_of(cfg), batches=batches, task_type=task_type)


@PEFT.register(C.LoRAGGPOConfig)
def _lora_ggpo(cfg: C.LoRAGGPOConfig, model: nn.Module, batches: InitBatches = None, *,
               task_type: str | None = None, loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_lora_ggpo(model, **fields_of(cfg), task_type=task_type)


@PEFT.register(C.LoRAProConfig)
def _lora_pro(cfg: C.LoRAProConfig, model: nn.Module, batches: InitBatches = None, *,
              task_type: str | None = None, loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_lora_pro(model, **fields_of(cfg), task_type=task_type)


@PEFT.register(C.ALLoRAConfig)
def _allora(cfg: C.ALLoRAConfig, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
            loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_allora(model, **fields_of(cfg), task_type=task_type)


@PEFT.register(C.LoRASBConfig)
def _lora_sb(cfg: C.LoRASBConfig, model: nn.Module, batches: InitBatches = None, *,
             task_type: str | None = None, loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_lora_sb(model, **fields_of(cfg), batches=batches, loss_fn=loss_fn, task_type=task_type)


@PEFT.register(C.LISAConfig)
def _lisa(cfg: C.LISAConfig, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
          loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_lisa(model, **fields_of(cfg), task_type=task_type)


@PEFT.register(C.OwLoreConfig)
def _owlore(cfg: C.OwLoreConfig, model: nn.Module, batches: InitBatches = None, *, task_type: str | None = None,
            loss_fn: LossFn = default_loss_fn) -> PeftHandle:
    return apply_owlore(model, **fields_of(cfg), batches=batches, task_type=task_type)
