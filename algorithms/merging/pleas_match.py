"""PLeaS step 1 (Nasery et al. 2024, sec. 3.1): partial matching of units by activation alignment.

For one layer of two models A and B (d units each) we compute the correlation of every A unit with
every B unit over the data (each example and spatial position a sample, as in activation matching
of Git Re-Basin), solve the linear assignment that maximises the total correlation
(``scipy.optimize.linear_sum_assignment``), and merge only the best-aligned pairs: for a merged
width k in [d, 2d] the 2d - k most correlated pairs are merged and the other units of A and of B are
kept side by side (k = d: every unit merged, k = 2d: nothing merged, the two models side by side).
Widths below d (an extension: the paper's budgets stay at or above the inputs' size) keep the k
most correlated pairs and drop the rest; the least-squares step then compensates as it can.
"""

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


@dataclass
class UnitMatch:
    """Which units of A and B make up the merged layer, in its order: merged pairs, A-only, B-only."""

    pairs_a: torch.Tensor
    pairs_b: torch.Tensor
    only_a: torch.Tensor
    only_b: torch.Tensor

    @property
    def width(self) -> int:
        return len(self.pairs_a) + len(self.only_a) + len(self.only_b)

    def groups(self) -> torch.Tensor:
        """Per merged unit: 0 = merged pair (shared), 1 = from A only, 2 = from B only."""
        return torch.cat(
            [
                torch.zeros(len(self.pairs_a), dtype=torch.long),
                torch.ones(len(self.only_a), dtype=torch.long),
                torch.full((len(self.only_b),), 2, dtype=torch.long),
            ]
        )

    def embed(self, ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        """Features of A and B (units on dim 1) in the merged layer's units: the mean of each merged
        pair, then A's and B's unmatched units. This is P_A z_A and P_B z_B combined as in the
        paper's objective, where a merged unit must reproduce both of its sources."""
        return torch.cat(
            [(ta[:, self.pairs_a] + tb[:, self.pairs_b]) / 2, ta[:, self.only_a], tb[:, self.only_b]], 1
        )

    @staticmethod
    def identity(d: int) -> "UnitMatch":
        """Units shared by construction (the raw input, the output logits): unit i with unit i."""
        empty = torch.zeros(0, dtype=torch.long)
        return UnitMatch(torch.arange(d), torch.arange(d), empty, empty)


def correlation(fa: torch.Tensor, fb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(d_a, d_b) Pearson correlation between the columns of fa and fb (samples on dim 0)."""
    fa, fb = fa.double(), fb.double()
    za = (fa - fa.mean(0)) / (fa.std(0, unbiased=False) + eps)
    zb = (fb - fb.mean(0)) / (fb.std(0, unbiased=False) + eps)
    return za.T @ zb / fa.shape[0]


def match_units(fa: torch.Tensor, fb: torch.Tensor, width: int) -> UnitMatch:
    """Partial matching of the units (columns) of fa and fb for a merged layer of ``width`` units."""
    d = fa.shape[1]
    if fb.shape[1] != d:
        raise ValueError(f"pleas: layer widths differ ({d} vs {fb.shape[1]})")
    if not 1 <= width <= 2 * d:
        raise ValueError(f"pleas: merged width {width} outside [1, {2 * d}]")
    corr = correlation(fa, fb)
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    rows_t, cols_t = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    n_pairs = 2 * d - width if width >= d else width
    best = corr[rows_t, cols_t].argsort(descending=True, stable=True)[:n_pairs]
    keep = best.sort().values  # merged pairs in A's unit order
    pairs_a, pairs_b = rows_t[keep], cols_t[keep]
    if width >= d:
        only_a = _complement(pairs_a, d)
        only_b = _complement(pairs_b, d)
    else:
        only_a = only_b = torch.zeros(0, dtype=torch.long)
    return UnitMatch(pairs_a, pairs_b, only_a, only_b)


def _complement(idx: torch.Tensor, d: int) -> torch.Tensor:
    mask = torch.ones(d, dtype=torch.bool)
    mask[idx] = False
    return torch.arange(d)[mask]
