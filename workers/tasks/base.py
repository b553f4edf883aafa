"""What every task gives the training loop: a model, batches for a rank, a loss, an evaluation."""

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


class Task(Protocol):
    kind: str
    tokens_per_sample: int  # 0 when the task has no tokens (images)

    def build_model(self) -> nn.Module: ...

    def batches(self, *, rank: int, world: int, batch_size: int, seed: int,
                label_flip: bool = False) -> Iterator[Batch]:
        """An endless stream of this rank's batches (its own shard, reshuffled each epoch)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, device: torch.device, max_batches: int) -> dict[str, float]: ...


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device``: a tuple of tensors (the built-in
    tasks) or whatever a default collate makes of a user's samples (dicts, lists, nested)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def sharded_epochs(n: int, *, rank: int, world: int, seed: int, batch_size: int = 1) -> Iterator[torch.Tensor]:
    """Per epoch, a permutation of 0..n-1 split across ranks (each rank its own slice).

    A rank's slice must hold at least one batch: otherwise no batch could ever be drawn.
    """
    if n // world < batch_size:
        raise ValueError(f"train.batch_size: a worker's batch of {batch_size} is larger than its share of the "
                         f"training data ({n // world} of {n} examples over {world} workers or parts)")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        yield perm[rank::world]
        epoch += 1
