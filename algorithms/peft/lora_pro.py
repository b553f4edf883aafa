"""LoRA-Pro (Wang et al., 2024, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?").

With W = W0 + s B A (B: m x r, A: r x n) one SGD step on (A, B) changes W by -lr times the
*equivalent gradient* g~ = s (B g^A + g^B A). Plain LoRA uses g^A = s B^T g, g^B = s g A^T
(g the full gradient dL/dW), so g~ = s^2 (B B^T g + g A^T A), a poor match for g.

Theorem 2.2 gives the gradients minimising ||g~ - g||_F, written with the LoRA gradients only
(s B^T g = g^A_lora, s g A^T = g^B_lora, so the full gradient is never formed)::

    g^A = 1/s^2 (B^T B)^-1 g^A_lora + X A
    g^B = 1/s^2 [I - B (B^T B)^-1 B^T] g^B_lora (A A^T)^-1 - B X

for any r x r X; the resulting g~ = P_B g + (I - P_B) g P_A is the orthogonal projection of g
onto the tangent space of rank-r matrices at BA. Theorem 2.3 picks the X that keeps (g^A, g^B)
closest to the LoRA gradients: the Sylvester equation

    B^T B X + X A A^T = -1/s^2 (B^T B)^-1 g^A_lora A^T.

Both Gram matrices are symmetric positive (semi)definite, so the Sylvester equation is solved
as an r^2 x r^2 linear system (Kronecker form), batched over every layer: a single batched
solve per step instead of two eigen-decompositions per layer.

Deviations from the authors' code, on purpose (NOTES.md): the scale s is the layer's real
``lora_alpha / r`` (their code hard-codes 2), and the adjusted gradients are handed to whatever
optimizer the run configured, with no m x n Adam moments (the paper's Adam variant keeps the
full-size moments of g~, which costs full fine-tuning's optimizer memory). For SGD the step is
exactly the paper's; for Adam it is Adam on the adjusted low-rank gradients.

Both Gram matrices get a ridge relative to their size, ``damping`` times their mean diagonal
(the authors' 1e-8 by default), so that it changes nothing at any scale of A and B: at LoRA's own
scales the diagonal of B^T B is m |b|^2, far below 1 for entries b of B of 1e-2..1e-3, where an
absolute ridge would dominate the matrix and bend the projection. The only absolute term is a
guard of 1e-30 for an all-zero Gram matrix, i.e. B = 0 at initialisation: then g^A_lora = 0
exactly, X = 0 and g^B = g^B_lora (AA^T)^-1 / s^2, and the guard only keeps the inverse finite.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from algorithms.peft.base import PeftHandle
from algorithms.peft.lora import LoraPair, apply_lora, lora_pairs

_ZERO_GUARD = 1e-30  # absolute floor of the ridge: only an all-zero Gram matrix (B = 0) reaches it


def _ridge(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """gram + damping * mean(diag(gram)) * I (see the module docstring)."""
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    scale = (gram.diagonal(dim1=-2, dim2=-1).mean(-1) * damping).clamp_min(_ZERO_GUARD)
    return gram + scale[..., None, None] * eye


def solve_sylvester_spd(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Solve P X + X Q = C for X (batched over leading dims), via (I (x) P + Q^T (x) I) vec X = vec C."""
    r = P.shape[-1]
    eye = torch.eye(r, dtype=P.dtype, device=P.device)
    # column-major vec: vec(P X) = (I kron P) vec X, vec(X Q) = (Q^T kron I) vec X
    K = torch.kron(eye, P) if P.dim() == 2 else _bkron(eye.expand_as(P), P)
    Qt = Q.mT.contiguous()
    K = K + (torch.kron(Qt, eye) if Q.dim() == 2 else _bkron(Qt, eye.expand_as(Q)))
    vec_c = C.mT.reshape(*C.shape[:-2], r * r, 1)
    vec_x = torch.linalg.solve_ex(K, vec_c)[0]  # _ex: no error check, so no host sync
    return vec_x.reshape(*C.shape[:-2], r, r).mT


def _bkron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product of (N, p, q) and (N, s, t) -> (N, p*s, q*t)."""
    n, p, q = a.shape
    _, s, t = b.shape
    return (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(n, p * s, q * t)


@torch.no_grad()
def lora_pro_gradients(
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scaling: float,
    damping: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorems 2.2 + 2.3 for one layer (or a batch of layers with leading dims); float32 inside."""
    dt = grad_A.dtype
    A, B, gA, gB = (t.float() for t in (A, B, grad_A, grad_B))
    s2 = scaling * scaling
    BtB = _ridge(B.mT @ B, damping)
    AAt = _ridge(A @ A.mT, damping)
    BtB_inv = torch.linalg.inv_ex(BtB)[0]  # ridged SPD: invertible; _ex avoids a host sync
    AAt_inv = torch.linalg.inv_ex(AAt)[0]
    X = solve_sylvester_spd(BtB, AAt, -(BtB_inv @ gA @ A.mT) / s2)
    new_A = (BtB_inv @ gA) / s2 + X @ A
    # [I - B (B^T B)^-1 B^T] g^B_lora, without forming the m x m projector
    proj_gB = gB - B @ (BtB_inv @ (B.mT @ gB))
    new_B = (proj_gB @ AAt_inv) / s2 - B @ X
    return new_A.to(dt), new_B.to(dt)


class LoRAProHandle(PeftHandle):
    """Replaces the A/B gradients of every LoRA layer in ``after_backward``."""

    pairs: list[LoraPair]
    damping: float  # the ridge, relative to the Gram matrix's mean diagonal (set by apply_lora_pro)

    def after_backward(self, step: int, model: nn.Module) -> None:
        # Group layers of equal shapes so that each group is one batched solve.
        groups: dict[tuple[Any, ...], list[LoraPair]] = {}
        for p in self.pairs:
            if p.A.grad is None or p.B.grad is None:
                continue
            key = (tuple(p.A.shape), tuple(p.B.shape), p.scaling, p.A.device)
            groups.setdefault(key, []).append(p)
        for (_, _, scaling, _), ps in groups.items():
            new_A, new_B = lora_pro_gradients(
                torch.stack([p.A.detach() for p in ps]),
                torch.stack([p.B.detach() for p in ps]),
                torch.stack([p.A.grad for p in ps]),  # type: ignore[misc]
                torch.stack([p.B.grad for p in ps]),  # type: ignore[misc]
                scaling,
                self.damping,
            )
            grads: list[torch.Tensor] = [t.grad for p in ps for t in (p.A, p.B)]  # type: ignore[misc]
            torch._foreach_copy_(grads, [t for i in range(len(ps)) for t in (new_A[i], new_B[i])])


def apply_lora_pro(model: nn.Module, *, damping: float, **lora_kwargs: Any) -> LoRAProHandle:
    base = apply_lora(model, name="lora_pro", **lora_kwargs)
    handle = LoRAProHandle(name="lora_pro", model=base.model, merge_adapter=base.merge_adapter)
    handle.pairs = lora_pairs(handle.model)
    handle.damping = damping
    return handle
