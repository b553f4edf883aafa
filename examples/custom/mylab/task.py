"""A small regression task, written the way Orchestra's custom-task protocol asks.

``build(**params)`` returns an object with ``model()``, ``train_dataset()``, ``eval_dataset()``,
``loss(model, batch)`` and, optionally, ``metrics(model, batch)``. The datasets are ordinary
``torch.utils.data.Dataset`` objects; a batch is what torch's default collate makes of their
samples (here a dict of tensors). Nothing here knows about Ray, DeepSpeed or MLflow.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Waves(Dataset):
    """``y = sum_k sin(w_k . x)`` for inputs ``x`` in [-1, 1]^features, with a little noise."""

    def __init__(self, n: int, features: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(3, features, generator=torch.Generator().manual_seed(1234)) / math.sqrt(features)
        self.x = torch.rand(n, features, generator=g) * 2 - 1
        self.y = torch.sin(self.x @ directions.T).sum(-1) + 0.01 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class WavesTask:
    def __init__(self, width: int, depth: int, features: int, n_train: int, seed: int) -> None:
        self.width, self.depth, self.features = width, depth, features
        self.n_train, self.seed = n_train, seed

    def model(self) -> nn.Module:
        layers: list[nn.Module] = []
        d_in = self.features
        for _ in range(self.depth):
            layers += [nn.Linear(d_in, self.width), nn.Tanh()]
            d_in = self.width
        layers.append(nn.Linear(d_in, 1))
        return nn.Sequential(*layers)

    def train_dataset(self) -> Dataset:
        return Waves(self.n_train, self.features, self.seed)

    def eval_dataset(self) -> Dataset:
        return Waves(512, self.features, self.seed + 1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])

    def metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"mae": float((model(batch["x"]).squeeze(-1) - batch["y"]).abs().mean())}


def build(width: int = 64, depth: int = 2, features: int = 8, n_train: int = 4096, seed: int = 0) -> WavesTask:
    return WavesTask(width, depth, features, n_train, seed)
