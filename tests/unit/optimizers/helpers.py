"""Small models and a deterministic training loop shared by the optimizer tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class TwoLayer(nn.Module):
    """x -> fc2(tanh(fc1(x))): a tall (d_hidden x d_in) and a wide (d_out x d_hidden) matrix + biases."""

    def __init__(self, d_in: int = 16, d_hidden: int = 24, d_out: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


Batch = tuple[torch.Tensor, torch.Tensor]


def batches(n_steps: int, d_in: int = 16, d_out: int = 16, n: int = 32, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)) for _ in range(n_steps)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for batch in data:
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        opt.step()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((pa - pb).detach().abs().max()) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


class CountingClosure:
    """The worker loop's ``forward_backward(backward: bool)`` contract, counting passes."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor], batch: Any,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] = loss_of) -> None:
        self.model, self.params, self.batch, self.loss_fn = model, params, batch, loss_fn
        self.forwards = 0
        self.backwards = 0

    def __call__(self, backward: bool = True) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model, self.batch)
        self.forwards += 1
        if backward:
            loss.backward()
            self.backwards += 1
        return loss.detach()
