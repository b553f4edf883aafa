"""image_classification on scikit-learn's 8x8 digits (shipped with scikit-learn: offline)."""

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.spec.task import CNNModel, DigitsData, MLPModel
from workers.tasks.base import Batch, sharded_epochs, to_device

NUM_CLASSES = 10


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (N, 8, 8) and labels, read from the file scikit-learn ships without
    importing scikit-learn (a second of a worker's start); its loader where the file is not found."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def load_digits_split(test_fraction: float, classes: list[int] | None = None,
                      split_seed: int = 1234) -> tuple[torch.Tensor, ...]:
    """Digits as float images in [0, 1] (N, 1, 8, 8); a fixed stratified-by-shuffle split."""
    images, target = read_digits()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
    if classes is not None:
        keep = torch.isin(y_tr, torch.tensor(classes))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return x_tr, y_tr, x_te, y_te


def build_mlp(hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


def build_cnn(channels: list[int], hidden: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        c_in = c
    layers += [nn.Flatten(), nn.Linear(c_in * 64, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)]
    return nn.Sequential(*layers)


class DigitsTask:
    kind = "image_classification"
    tokens_per_sample = 0

    def __init__(self, data: DigitsData, model: MLPModel | CNNModel) -> None:
        self.model_spec = model
        self.x_tr, self.y_tr, self.x_te, self.y_te = load_digits_split(data.test_fraction, data.classes)

    def build_model(self) -> nn.Module:
        if isinstance(self.model_spec, MLPModel):
            return build_mlp(self.model_spec.hidden)
        return build_cnn(self.model_spec.channels, self.model_spec.hidden)

    def batches(self, *, rank: int, world: int, batch_size: int, seed: int,
                label_flip: bool = False) -> Iterator[Batch]:
        for idx in sharded_epochs(len(self.y_tr), rank=rank, world=world, seed=seed, batch_size=batch_size):
            for start in range(0, len(idx) - batch_size + 1, batch_size):
                take = idx[start:start + batch_size]
                y = self.y_tr[take]
                if label_flip:
                    y = NUM_CLASSES - 1 - y
                yield self.x_tr[take], y

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, max_batches: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        x, y = to_device((self.x_te, self.y_te), device)
        logits = model(x).float()
        model.train(was_training)
        return {"eval/loss": float(F.cross_entropy(logits, y)),
                "eval/accuracy": float((logits.argmax(-1) == y).float().mean())}
