"""The ``ddp`` strategy: torch's DistributedDataParallel over the process group Ray Train set up
(gloo on CPU, NCCL on GPU), or, when the robust gradient exchange runs, the bare model (the exchange
replaces DDP's all-reduce). Loss scaling with fp16 (a GradScaler; on GPU only), torch autocast for
bf16/fp16, gradient clipping and closure optimizers go through ``workers.optim.optimizer_step``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from service.spec import ExperimentSpec
from workers import checkpoint
from workers.optim import build_optimizer, optimizer_step
from workers.schedule import build_scheduler
from workers.strategy.base import AUTOCAST, Closure, Exchange, autocast, exchanged, state_bytes


class DDPStrategy:
    eval_on_all_ranks = False

    def __init__(self, spec: ExperimentSpec, model: nn.Module, device: torch.device, *, rank: int, world: int,
                 exchange: Exchange | None, peft_handle: Any = None) -> None:
        train = spec.train
        assert train is not None
        self.device, self.rank, self.exchange, self.grad_clip = device, rank, exchange, train.grad_clip
        model = model.to(device)
        if exchange is None and world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            cuda = [device] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=cuda, output_device=device if cuda else None)
        self.model = model
        self.optimizer = build_optimizer(spec, model, peft_handle)
        self.scheduler = build_scheduler(self.optimizer, train)
        self.dtype = AUTOCAST.get(train.precision)
        self.scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" else None

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device, self.dtype)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor, *, last: bool) -> None:
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None and not last else nullcontext():
            (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, forward_backward: Closure, step: int) -> tuple[Tensor, dict[str, float]]:
        metrics: dict[str, float] = {}
        closure = exchanged(forward_backward, self.exchange, self.model, step, metrics)
        loss = optimizer_step(self.optimizer, closure, model=self.model, scaler=self.scaler, grad_clip=self.grad_clip)
        self.scheduler.step()
        return loss, metrics

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def restore(self) -> int:
        return checkpoint.restore(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)

    def save(self, *, step: int, metrics: dict[str, float]) -> None:
        checkpoint.save_and_report(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, step=step,
                                   metrics=metrics, rank=self.rank)

    def optimizer_state_bytes(self) -> int:
        return state_bytes(self.optimizer)

    def final_model(self) -> nn.Module:
        return checkpoint.unwrap(self.model)
