"""The contract between a PEFT method and the worker's training loop.

``PEFT.build(cfg, model, batches, task_type=...)`` (or ``apply(name, model, **fields)``) returns a
:class:`PeftHandle`: the wrapped model plus the hooks the loop calls. The loop calls them in
exactly this order on every step::

    handle = PEFT.build(cfg, model, init_batches, task_type=...)
    groups = handle.param_groups(handle.model, lr)          # once, to build the optimizer
    optimizer = torch.optim.AdamW(groups, lr=lr)
    for step, batch in enumerate(loader):
        handle.on_step_start(step, handle.model)            # layer sampling, GGPO perturbation
        loss = loss_fn(handle.model, batch)                 # forward
        handle.before_backward(step, handle.model)
        loss.backward()
        handle.after_backward(step, handle.model)           # gradient adjustment, GGPO restore
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
    handle.save_adapter(handle.model, path)                 # peft format (or merged weights)

Notes on each hook:

- ``param_groups(model, lr)``: the optimizer's parameter groups (plain ``torch.optim`` dicts).
  Methods that act inside the optimizer step (ALLoRA's per-tensor learning rate, OwLore's GaLore
  update) do it through torch's optimizer step hooks (``optim_hooks.py``), which run after
  gradient clipping and see the optimizer's live state: the lr the schedule set for this step,
  and the groups and state that a checkpoint restore (``Optimizer.load_state_dict``) put there.
- ``on_step_start(step, model)``: before the forward pass. Anything that changes the weights
  the forward pass reads must happen here (autograd saves them for backward): LISA/OwLore
  resample their active layers, LoRA-GGPO adds its perturbation to the frozen base weights.
- ``before_backward(step, model)``: after the forward pass, before ``backward``. No method in
  this package needs it today; it is part of the contract so that one can.
- ``after_backward(step, model)``: after ``backward`` (and after DDP's all-reduce), before the
  optimizer step. LoRA-Pro replaces the A/B gradients here, LoRA-GGPO removes its perturbation.
  Optimizers that re-evaluate the loss (SAM-style closures) may call it several times a step.
- ``save_adapter(model, path)``: writes what HF can load: a peft adapter directory
  (``peft.PeftModel.from_pretrained``), or, with ``merge_adapter=True``, the merged model
  (``AutoModel*.from_pretrained``). LISA/OwLore train the model's own weights, so they write the
  full model with ``save_pretrained``.
- ``merge_into_base(model)``: the plain model (the architecture before ``apply``) with the
  adapter folded in, for a state dict that the un-adapted model loads. It may modify the
  handle's model in place: call it last.

The ``model`` argument is accepted for the loop's convenience (it may be a DDP wrapper); the
hooks act on the modules the handle captured at ``apply`` time, which stay the same objects.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """HF convention: a dict batch with ``labels``; the model returns an output with ``.loss``."""
    out = model(**batch)
    return out.loss if hasattr(out, "loss") else out["loss"]


@runtime_checkable
class PeftHandleProtocol(Protocol):
    """What the worker loop relies on (see the module docstring for the call order)."""

    name: str
    model: nn.Module

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]: ...
    def on_step_start(self, step: int, model: nn.Module) -> None: ...
    def before_backward(self, step: int, model: nn.Module) -> None: ...
    def after_backward(self, step: int, model: nn.Module) -> None: ...
    def save_adapter(self, model: nn.Module, path: str | Path) -> Path: ...
    def merge_into_base(self, model: nn.Module) -> nn.Module: ...
    def param_counts(self) -> tuple[int, int]: ...


@dataclass(eq=False)  # identity hash: live handles are kept in a WeakSet (optim_hooks)
class PeftHandle:
    """Default handle: a peft-wrapped model whose hooks do nothing.

    Methods subclass it and override the hooks they need.
    """

    name: str
    model: nn.Module
    merge_adapter: bool = False
    _groups: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._groups = [{"params": params, "lr": lr}]
        return self._groups

    def on_step_start(self, step: int, model: nn.Module) -> None:
        return None

    def before_backward(self, step: int, model: nn.Module) -> None:
        return None

    def after_backward(self, step: int, model: nn.Module) -> None:
        return None

    def save_adapter(self, model: nn.Module, path: str | Path) -> Path:
        """peft adapter directory, or merged full model when ``merge_adapter`` is set."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.merge_adapter:
            merged = copy.deepcopy(self.model).merge_and_unload()  # type: ignore[operator]
            merged.save_pretrained(str(out))
        else:
            self.model.save_pretrained(str(out))  # type: ignore[operator]
        return out

    def merge_into_base(self, model: nn.Module) -> nn.Module:
        """The un-adapted architecture with the adapter merged in (peft's ``merge_and_unload``, in
        place: the handle's model is consumed)."""
        return self.model.merge_and_unload()  # type: ignore[operator,no-any-return]

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, to be logged with the run."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total


InitBatches = Iterable[Batch] | None
