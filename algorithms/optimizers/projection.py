"""Subspace projections of a matrix gradient, shared by GaLore, LORENZA and DCT.

A gradient ``G`` (m x n) is projected on one side:

- ``right``: ``P`` is r x n with orthonormal rows; ``R = G P^T`` (m x r), back: ``R P``.
- ``left``: ``P`` is m x r with orthonormal columns; ``R = P^T G`` (r x n), back: ``P R``.
- ``full``: both, ``R = P^T G P2^T`` (r x r), back: ``P R P2``.

Back-projection is written straight into the parameter with ``addmm_`` (no m x n temporary).
"""

from typing import Literal

import torch

Side = Literal["right", "left", "full"]


def galore_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> Side:
    """The side galore-torch projects on for ``proj_type`` (std projects the longer side away)."""
    m, n = shape[0], shape[1]
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left", "full"):
        return proj_type  # type: ignore[return-value]
    raise ValueError(f"unknown proj_type {proj_type!r}")


def _work(grad: torch.Tensor) -> torch.Tensor:
    """float64 stays float64, anything else is computed in float32."""
    return grad if grad.dtype == torch.float64 else grad.float()


def svd_basis(grad: torch.Tensor, rank: int, side: Side) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-``rank`` singular vectors of ``grad`` by a full SVD in float32 (GaLore's choice; float64 kept).

    Returns ``(P, P2)``; ``P2`` only for ``full``. The result has ``grad``'s dtype.
    """
    u, _, vh = torch.linalg.svd(_work(grad), full_matrices=False)
    # contiguous copies: the slices would keep all of U / Vh alive (and LAPACK's column-major
    # layout makes later matmuls slower)
    if side == "right":
        return _own(vh[:rank], grad.dtype), None
    if side == "left":
        return _own(u[:, :rank], grad.dtype), None
    return _own(u[:, :rank], grad.dtype), _own(vh[:rank], grad.dtype)


def _own(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _range_finder(a: torch.Tensor, k: int, power_iters: int, gen: torch.Generator | None) -> torch.Tensor:
    """Orthonormal basis (rows(a) x k) of the dominant range of ``a`` (Halko et al. 2011, alg. 4.4)."""
    omega = torch.randn(a.shape[1], k, device=a.device, dtype=a.dtype, generator=gen)
    y = a @ omega
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(a.mT @ q)
        y = a @ z
    q, _ = torch.linalg.qr(y)
    return q


def randomized_svd_basis(grad: torch.Tensor, rank: int, side: Side, *, oversampling: int, power_iters: int,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-``rank`` singular subspace of ``grad`` by randomized SVD (range finder with ``oversampling``
    extra columns and ``power_iters`` subspace iterations, then the SVD of the small sketch).

    Falls back to the exact SVD when the sketch would be as wide as the matrix.
    """
    m, n = grad.shape
    k = rank + oversampling
    if k >= min(m, n):
        return svd_basis(grad, rank, side)
    a = _work(grad)
    if side == "right":
        q = _range_finder(a.mT, k, power_iters, generator)  # n x k, range of G^T
        ub, _, _ = torch.linalg.svd(q.mT @ a.mT, full_matrices=False)  # (k x m) small SVD
        return _own((q @ ub[:, :rank]).mT, grad.dtype), None
    q = _range_finder(a, k, power_iters, generator)  # m x k
    ub, _, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    left = _own(q @ ub[:, :rank], grad.dtype)
    if side == "left":
        return left, None
    return left, _own(vh[:rank], grad.dtype)


def project(grad: torch.Tensor, p: torch.Tensor, side: Side, p2: torch.Tensor | None = None) -> torch.Tensor:
    if side == "right":
        return grad @ p.mT
    if side == "left":
        return p.mT @ grad
    assert p2 is not None
    return p.mT @ grad @ p2.mT


def add_back_(target: torch.Tensor, low: torch.Tensor, p: torch.Tensor, side: Side, alpha: float,
              p2: torch.Tensor | None = None) -> None:
    """``target += alpha * back(low)`` without an m x n temporary (except for ``full``)."""
    if side == "right":
        target.addmm_(low, p, alpha=alpha)
    elif side == "left":
        target.addmm_(p, low, alpha=alpha)
    else:
        assert p2 is not None
        target.addmm_(p @ low, p2, alpha=alpha)


def transfer_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, side: Side,
                      old: tuple[torch.Tensor, torch.Tensor | None],
                      new: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Carry Adam's moments from the old basis into the new one, in place.

    The first moment is a vector of coordinates: ``m' = T m`` with ``T = P_new^T P_old`` (the
    exact change of coordinates of what lies in both subspaces; components outside the new one
    are dropped). The second moment is elementwise, so it cannot be rotated exactly; it is
    carried as ``v' = (T*T) v``, the variance of ``T g`` if the coordinates of ``g`` were
    uncorrelated. For an index-selected basis (DCT) ``T`` is a 0/1 matching matrix and both rules
    are exact: each moment slot follows its basis vector, new vectors start from zero.
    """
    if side == "right":
        t = old[0] @ new[0].mT  # r x r
        exp_avg.copy_(exp_avg @ t)
        exp_avg_sq.copy_(exp_avg_sq @ (t * t))
    elif side == "left":
        t = new[0].mT @ old[0]
        exp_avg.copy_(t @ exp_avg)
        exp_avg_sq.copy_((t * t) @ exp_avg_sq)
    else:
        o2, n2 = old[1], new[1]
        assert o2 is not None and n2 is not None
        tl = new[0].mT @ old[0]
        tr = o2 @ n2.mT
        exp_avg.copy_(tl @ exp_avg @ tr)
        exp_avg_sq.copy_((tl * tl) @ exp_avg_sq @ (tr * tr))


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (n x n): ``C[k, j] = sqrt(2/n) cos(pi k (2j+1) / 2n)``, row 0
    scaled by ``1/sqrt(2)``. Built in float64, then cast.

    The DCT optimizer (like the authors' ``DCTAdamW``) uses the COLUMNS of this matrix as its
    basis: coefficients of the rows of ``G`` are ``G @ C``.
    """
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(torch.pi * k * (2 * j + 1) / (2 * n)) * (2.0 / n) ** 0.5
    c[0] *= 0.5**0.5
    return c.to(dtype=dtype, device=device)
