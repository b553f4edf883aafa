"""The interface every merger implements."""

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

# One item of the data a merger may use: a batch of inputs, an (inputs, labels) pair, or a
# dict of keyword arguments for the model (HF style, labels under "labels").
Batch = Any


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
