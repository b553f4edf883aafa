"""Strategies for the Ray Train loop: ``ddp`` (``ddp.py``) and ``deepspeed`` (``deepspeed.py``),
both behind ``base.Strategy``. The parameter server is not one: it runs its own server loop
(``workers.parameter_server``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.spec import ExperimentSpec
from workers.exchange import build_exchange
from workers.plan import RunPlan
from workers.strategy.base import Strategy


def build_strategy(spec: ExperimentSpec, plan: RunPlan, model: nn.Module, device: torch.device, *, rank: int,
                   world: int, peft_handle: Any = None) -> Strategy:
    """The plan's strategy around ``model``, with the gradient exchange the plan decided on."""
    exchange = build_exchange(spec, plan.exchange, rank=rank, world=world)
    if plan.strategy == "deepspeed":
        from workers.strategy.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(spec, plan, model, device, exchange=exchange, peft_handle=peft_handle)
    from workers.strategy.ddp import DDPStrategy

    return DDPStrategy(spec, model, device, rank=rank, world=world, exchange=exchange, peft_handle=peft_handle)
