"""The interface every merger implements, and what the merge job may give a builder."""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

# One item of the data a merger may use: a batch of inputs, an (inputs, labels) pair, or a
# dict of keyword arguments for the model (HF style, labels under "labels").
Batch = Any


@dataclass(frozen=True)
class MergeContext:
    """What the merge job knows about the task beyond the models and the data, given to a builder
    where the method's config asks for it (``needs_loss()``, ``needs_example_shape()``)."""

    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None  # the task's loss on one batch
    example_shape: list[int] | None = None  # one example's shape (a batch's first tensor without its batch dim)


@runtime_checkable
class Merger(Protocol):
    def merge(
        self,
        models: Sequence[nn.Module],
        base: nn.Module | None = None,
        data: Iterable[Batch] | None = None,
    ) -> nn.Module:
        """Return a new module; ``models`` and ``base`` are left untouched."""
        ...
