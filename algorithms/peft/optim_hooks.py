"""Optimizer-step hooks for the PEFT methods that act inside ``optimizer.step()``.

ALLoRA scales each LoRA tensor's learning rate and OwLore runs its GaLore update on the sampled
layers' matrices. Both need the optimizer's *current* parameter groups: the ``lr`` that the
schedule set for this step, the betas and weight decay. A handle cannot keep references to
the group dicts it handed out: ``Optimizer.load_state_dict`` (a checkpoint restore) replaces
them with new dicts. torch's global step hooks receive the optimizer itself, so they always see
its live groups; they also run after gradient clipping and AMP unscaling, and only when the
step really happens (``GradScaler`` skips a step whose gradients are not finite).

One pair of global hooks is installed per process, the first time a handle attaches. Each
live handle (held weakly: a dropped handle stops being called) gets ``pre_step(optimizer)``
and ``post_step(optimizer)``, and leaves alone any optimizer that does not hold its parameters.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch


class StepHookUser(Protocol):
    def pre_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def post_step(self, optimizer: torch.optim.Optimizer) -> None: ...


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_installed = False


def _pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for user in list(_LIVE):
        user.pre_step(optimizer)


def _post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for user in list(_LIVE):
        user.post_step(optimizer)


def attach(user: StepHookUser) -> None:
    """Call ``user.pre_step`` / ``post_step`` around every optimizer step from now on."""
    global _installed
    if not _installed:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        register_optimizer_step_pre_hook(_pre)
        register_optimizer_step_post_hook(_post)
        _installed = True
    _LIVE.add(user)


def detach(user: StepHookUser) -> None:
    _LIVE.discard(user)


def groups_holding(optimizer: torch.optim.Optimizer, ids: set[int]) -> list[dict[str, Any]]:
    """The optimizer's groups whose first parameter is one of ``ids``."""
    return [g for g in optimizer.param_groups if g["params"] and id(g["params"][0]) in ids]
