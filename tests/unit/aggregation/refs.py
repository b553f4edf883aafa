"""Independent reference implementations, written from the papers' definitions: numpy, float64,
plain loops over workers and coordinates, full d-dimensional linear algebra (no Gram tricks)."""

from __future__ import annotations

import numpy as np


def trimmed_mean(x: np.ndarray, f: int) -> np.ndarray:
    n, d = x.shape
    return np.array([np.mean(sorted(x[:, j])[f:n - f]) for j in range(d)])


def krum_scores(x: np.ndarray, f: int, rows: list[int] | None = None) -> dict[int, float]:
    rows = list(range(len(x))) if rows is None else rows
    k = max(len(rows) - f - 2, 1)
    scores = {}
    for i in rows:
        dists = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in rows if j != i)
        scores[i] = sum(dists[:k])
    return scores


def krum(x: np.ndarray, f: int) -> np.ndarray:
    scores = krum_scores(x, f)
    return x[min(scores, key=lambda i: (scores[i], i))]


def multi_krum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    scores = krum_scores(x, f)
    best = sorted(scores, key=lambda i: (scores[i], i))[:m]
    return np.mean(x[best], axis=0)


def bulyan(x: np.ndarray, f: int) -> np.ndarray:
    n, d = x.shape
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        scores = krum_scores(x, f, remaining)
        best = min(scores, key=lambda i: (scores[i], i))
        selected.append(best)
        remaining.remove(best)
    beta = len(selected) - 2 * f
    out = np.empty(d)
    for j in range(d):
        vals = x[selected, j]
        med = np.median(vals)
        closest = sorted(vals, key=lambda v: abs(v - med))[:beta]
        out[j] = np.mean(closest)
    return out


def geomed_objective(x: np.ndarray, z: np.ndarray) -> float:
    return float(sum(np.linalg.norm(xi - z) for xi in x))


def flag(x: np.ndarray, r: int, max_iter: int, eps: float, lam: float = 0.0,
         y0: np.ndarray | None = None) -> np.ndarray:
    """The Flag Aggregator in d-space: normalise, IRLS flag median by SVDs of the weighted
    d x (n + pairs) data matrix, return (1/r) sum_i Y Y^T x_i. ``y0``: a starting subspace
    (as the authors' random start); ``None``: every first weight (1 + eps)^(-1/4)."""
    n, d = x.shape
    xs = [row / max(np.linalg.norm(row), 1e-12) for row in x]

    def objective(y: np.ndarray) -> float:
        return float(sum(np.sqrt(max(0.0, 1.0 - np.sum((y.T @ v) ** 2))) for v in xs))

    def weighted_columns(y: np.ndarray | None) -> np.ndarray:
        cols = []
        for v in xs:
            sinsq = 1.0 if y is None else abs(1.0 - np.sum((y.T @ v) ** 2))
            cols.append((sinsq + eps) ** -0.25 * v)
        if lam > 0:
            for i in range(n):
                for j in range(n):
                    if i != j:
                        diff = xs[i] - xs[j]
                        sinsq = 1.0 if y is None else abs(1.0 - np.sum((y.T @ diff) ** 2))
                        cols.append((sinsq + eps) ** -0.25 * lam / (n * (n - 1)) * diff)
        return np.stack(cols, axis=1)

    y_cur = y0
    prev = float(n) if y0 is None else objective(y0)
    best = None
    for _ in range(max_iter):
        u = np.linalg.svd(weighted_columns(y_cur), full_matrices=False)[0]
        y = u[:, :r]
        obj = objective(y)
        if best is not None and prev - obj <= 1e-10:
            break
        best, prev, y_cur = y, obj, y
        if obj <= 1e-10:
            break
    assert best is not None
    return sum(best @ (best.T @ v) for v in xs) / r


# --- the order statistics to the bit ---------------------------------------------------------------
# The definitions that the torch paths and the Triton kernels of algorithms/aggregation/order_kernels.py
# share (see its docstring), written once more with numpy scalars in the input's precision, one
# coordinate at a time: np.sort (NaN last), each operation rounded as IEEE arithmetic in that dtype,
# sums in float32 in ascending order, one division.


def _acc_dtype(dtype: np.dtype) -> type:
    return np.float64 if dtype == np.float64 else np.float32


def _exact_median(s: np.ndarray) -> np.generic:
    """The median of a sorted column: the middle value, or the two middle ones added, then halved."""
    n = len(s)
    lo, hi = s[(n - 1) // 2], s[n // 2]
    if n % 2:
        return lo
    return (lo + hi) * s.dtype.type(0.5)


def _exact_mean(values: list[np.generic], dtype: np.dtype) -> np.generic:
    acc_type = _acc_dtype(dtype)
    acc = acc_type(values[0])
    for v in values[1:]:
        acc = acc_type(acc + acc_type(v))
    return dtype.type(acc / acc_type(len(values)))


def exact_median(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as on the device
        return np.array([_exact_median(np.sort(x[:, j])) for j in range(x.shape[1])], dtype=x.dtype)


def exact_trimmed_mean(x: np.ndarray, f: int) -> np.ndarray:
    n, d = x.shape
    with np.errstate(invalid="ignore"):
        return np.array([_exact_mean(list(np.sort(x[:, j])[f:n - f]), x.dtype) for j in range(d)], dtype=x.dtype)


def exact_bulyan_step(x: np.ndarray, rows: list[int], f: int) -> np.ndarray:
    """Over the rows ``rows``: of each sorted column, drop 2f times the end farther from the median (the
    upper one on a tie, or when a distance is NaN), average what is left; NaN where the median is."""
    out = np.empty(x.shape[1], dtype=x.dtype)
    with np.errstate(invalid="ignore"):
        for j in range(x.shape[1]):
            out[j] = _exact_bulyan_column(np.sort(x[rows, j]), f)
    return out


def _exact_bulyan_column(s: np.ndarray, f: int) -> np.generic:
    med = _exact_median(s)
    if np.isnan(med):
        return med
    dist = [abs(v - med) for v in s]
    left, right = 0, len(s) - 1
    for _ in range(2 * f):
        if dist[left] > dist[right]:
            left += 1
        else:
            right -= 1
    return _exact_mean(list(s[left:right + 1]), s.dtype)

