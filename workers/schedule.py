"""Learning-rate schedule from ``train``: linear warmup, then constant, cosine or linear decay."""

import math

import torch

from service.spec.train import TrainSpec


def lr_lambda(train: TrainSpec):  # type: ignore[no-untyped-def]
    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if train.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
