"""``task.kind: custom``: the user's own model, data and loss, run by every training feature.

``task.entrypoint`` names ``module:function`` in the run's code bundle (the job's working
directory) or in an installed package; ``function(**task.params)`` returns an object with

- ``model() -> torch.nn.Module``
- ``train_dataset() -> torch.utils.data.Dataset``
- ``eval_dataset() -> torch.utils.data.Dataset | None``
- ``loss(model, batch) -> torch.Tensor`` (a scalar; ``batch`` is what torch's default collate
  makes of the dataset's samples)
- optionally ``metrics(model, batch) -> dict[str, float]``, averaged over the evaluation batches
  and logged as ``eval/<name>`` beside ``eval/loss``.

This adapter gives the training loop, the strategies and the parameter server the interface of
a built-in task (:class:`workers.tasks.base.Task`): the rank's shard of the training set as an
endless stream of batches, the loss, the evaluation. Errors of the user's code propagate with
their own traceback (the run fails with it); a loss that is not a scalar is refused by name.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from service.spec.task import CustomTaskSpec
from workers.tasks.base import sharded_epochs, to_device

REQUIRED = ("model", "train_dataset", "eval_dataset", "loss")


def load_user_task(spec: CustomTaskSpec) -> Any:
    """Import ``module:function`` and call it with ``params``; the job's working directory (the
    code bundle) is importable in every process of the run."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name, _, function_name = spec.entrypoint.partition(":")
    module = importlib.import_module(module_name)
    build = getattr(module, function_name, None)
    if not callable(build):
        raise AttributeError(f"task.entrypoint: module {module_name!r} has no function {function_name!r}")
    user = build(**spec.params)
    missing = [name for name in REQUIRED if not callable(getattr(user, name, None))]
    if missing:
        raise TypeError(f"task.entrypoint: {spec.entrypoint}(...) returned {type(user).__name__}, which lacks "
                        f"{', '.join(missing)} (README, 'Your own code')")
    return user


class CustomTask:
    kind = "custom"
    tokens_per_sample = 0

    def __init__(self, spec: CustomTaskSpec) -> None:
        self.spec = spec
        self.user = load_user_task(spec)
        self._train: Dataset[Any] | None = None

    def build_model(self) -> nn.Module:
        model = self.user.model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"task.entrypoint: model() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def _train_set(self) -> Dataset[Any]:
        if self._train is None:
            self._train = self.user.train_dataset()
        return self._train

    def batches(self, *, rank: int, world: int, batch_size: int, seed: int,
                label_flip: bool = False) -> Iterator[Any]:
        """This rank's shard, reshuffled each epoch, in batches of ``batch_size`` (default collate)."""
        if label_flip:
            raise ValueError("faults.byzantine.attack: label_flip does not apply to a custom task")
        data = self._train_set()
        for idx in sharded_epochs(len(data), rank=rank, world=world, seed=seed, batch_size=batch_size):  # type: ignore[arg-type]
            for start in range(0, len(idx) - batch_size + 1, batch_size):
                yield default_collate([data[int(i)] for i in idx[start:start + batch_size]])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        value = self.user.loss(model, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"task.entrypoint: loss(model, batch) must return a scalar tensor, got {shape}")
        return value.reshape(())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, max_batches: int) -> dict[str, float]:
        """Mean loss (and the user's metrics) over up to ``max_batches`` batches of the evaluation
        set, in its order; nothing when there is no evaluation set."""
        data = self.user.eval_dataset()
        if data is None:
            return {}
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        size = 64
        metrics = getattr(self.user, "metrics", None)
        for start in range(0, len(data), size):
            if count >= max_batches:
                break
            batch = to_device(default_collate([data[i] for i in range(start, min(start + size, len(data)))]), device)
            values = {"loss": float(self.loss(model, batch))}
            if callable(metrics):
                values.update({str(k): float(v) for k, v in metrics(model, batch).items()})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
        model.train(was_training)
        return {f"eval/{k}": v / max(count, 1) for k, v in sums.items()}
