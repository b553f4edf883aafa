"""Weight averaging ("model soup", Wortsman et al. 2022): theta = sum_i w_i theta_i, sum_i w_i = 1."""

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from algorithms.merging._state import StateDict, check_compatible, is_mergeable, module_with_state
from algorithms.merging.adapters import unwrap_adapters
from algorithms.merging.base import Batch
from algorithms.merging.config import AverageConfig


def average_state_dicts(sds: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted mean of mergeable entries (weights normalised); other entries from the first."""
    w = _normalised(weights, len(sds))
    out: StateDict = {}
    for k, ref in sds[0].items():
        if is_mergeable(ref):
            acc = sum(wi * sd[k].to(torch.float64) for wi, sd in zip(w, sds, strict=True))
            out[k] = torch.as_tensor(acc).to(ref.dtype)
        else:
            out[k] = ref.clone()
    return out


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} given for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights: must be non-negative and not all zero")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


class AverageMerger:
    def __init__(self, cfg: AverageConfig) -> None:
        self.weights = None if cfg.weights is None else list(cfg.weights)

    def merge(
        self, models: Sequence[nn.Module], base: nn.Module | None = None, data: Iterable[Batch] | None = None
    ) -> nn.Module:
        """Average the inputs; ``base`` and ``data`` are not used."""
        models, base = unwrap_adapters(models, base)
        sds = check_compatible(models)
        return module_with_state(models[0], average_state_dicts(sds, self.weights))
