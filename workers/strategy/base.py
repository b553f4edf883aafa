"""What the training loop asks of a strategy (ddp, deepspeed): the seam between the loop and the
way the model is distributed.

The loop builds the task's model (it knows nothing of distribution), hands it to a strategy, and
then only calls the strategy: ``autocast`` around each forward, ``backward`` per micro-batch,
``step`` once per optimizer step (gradient exchange, clipping, loss scaling, the optimizer and the
schedule, or a closure optimizer re-running the loop's forward and backward), ``save``/``restore``
for checkpoints through Ray Train, ``final_model`` for the artifact. The gradient exchange is
decided once (``workers.plan``) and handed to the strategy already built.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

Closure = Callable[..., Tensor]  # forward_backward(backward: bool = True) -> the step's loss
Exchange = Callable[[nn.Module, int], dict[str, float]]  # (model, step) -> metrics; rewrites p.grad

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy(Protocol):
    model: nn.Module  # what the loop runs forward: the wrapped model (DDP, DeepSpeed's engine)
    device: torch.device
    eval_on_all_ranks: bool  # evaluation is a collective (ZeRO-3), not rank 0's alone

    def autocast(self) -> AbstractContextManager[Any]: ...

    def zero_grad(self) -> None:
        """Called at the start of each forward_backward (a closure optimizer runs it more than once)."""

    def backward(self, loss: Tensor, *, last: bool) -> None:
        """One micro-batch's backward; ``last``: the accumulation boundary, where ranks synchronise."""

    def step(self, forward_backward: Closure, step: int) -> tuple[Tensor, dict[str, float]]:
        """One optimizer step and one step of the schedule: the step's loss and the exchange's metrics."""

    @property
    def lr(self) -> float: ...

    def restore(self) -> int:
        """Load the last checkpoint Ray Train reported, if any; the step to resume from (0: none)."""

    def save(self, *, step: int, metrics: dict[str, float]) -> None:
        """A checkpoint reported to Ray Train (every rank calls this)."""

    def final_model(self) -> nn.Module:
        """The whole trained model (on rank 0 at least; every rank must call this)."""

    def optimizer_state_bytes(self) -> int:
        """The bytes of this rank's optimizer state (moments, projections): what the low-rank
        methods save."""


def state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors in an optimizer's per-parameter state, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values() if isinstance(state, dict) else ():
            if isinstance(value, Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def exchanged(forward_backward: Closure, exchange: Exchange | None, model: nn.Module, step: int,
              metrics: dict[str, float]) -> Closure:
    """``forward_backward`` followed, after each backward pass, by the gradient exchange (which
    writes its metrics into ``metrics``); the closure optimizers' extra passes are exchanged too."""
    if exchange is None:
        return forward_backward

    def closure(backward: bool = True) -> Tensor:
        loss = forward_backward(backward)
        if backward:
            metrics.update(exchange(model, step))
        return loss

    return closure
