"""LoRA-GGPO (Chang et al., 2025, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization", arXiv 2502.14538).

GGPO smooths the loss over random weight perturbations, min_{A,B} E_eps L(W0 + sBA + eps), with
a Gaussian eps whose per-row variance is guided by both the weight norm and the gradient norm
of the merged weight W' = W0 + sBA (Flat-LoRA's filter-wise random perturbation, extended with
gradient information), so that one forward/backward per step suffices (no SAM double pass).

Per adapted layer (W' is m x n) and output row i we draw eps_ij ~ N(0, sigma_i^2) with

    sigma_i^2 = rho^2 / n * [ (1 - beta) ||W'_i||^2 + beta * ||G_i||^2 * ||W'||_F^2 / ||G||_F^2 ]

where G is the previous step's low-rank view of the full gradient of W', G = g^B_lora / s
(= dL/dW' A^T: the part of the full gradient that the adapter sees; it is free, the full m x n
gradient never exists in LoRA). The gradient term is rescaled to the weight's Frobenius norm so
that ``beta`` mixes two quantities of the same size; ``rho`` is the relative radius. On the first
step there is no gradient yet and beta is treated as 0.

The perturbation goes on the frozen base weight before the forward pass (``on_step_start``:
autograd saves the weight it read) and is removed after backward (``after_backward``) by
restoring a saved copy, which is exact in any dtype (W + eps - eps is not, in bf16). The noise
comes from the handle's own seeded generator, so every data-parallel rank draws the same eps.
The row norms of W' are computed without forming W' (``merged_row_norms_sq``), and those of the
frozen W0 once: per step the cost is one matmul W0 A^T, the noise, and the copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from algorithms.peft.base import PeftHandle
from algorithms.peft.lora import LoraPair, apply_lora, lora_pairs


@torch.no_grad()
def ggpo_row_std(
    merged: torch.Tensor, grad_rows: torch.Tensor | None, rho: float, beta: float
) -> torch.Tensor:
    """sigma_i for each row of the merged weight (see the module docstring); the reference form."""
    w_rows = merged.float().pow(2).sum(1)
    return _row_std(w_rows, merged.shape[1], grad_rows, rho, beta)


def _row_std(
    w_rows: torch.Tensor, n: int, grad_rows: torch.Tensor | None, rho: float, beta: float
) -> torch.Tensor:
    """sigma_i from the squared row norms ``w_rows`` of W' (length m) and the gradient rows."""
    var = w_rows if grad_rows is None else (1.0 - beta) * w_rows
    if grad_rows is not None and beta > 0.0:
        g_rows = grad_rows.float().pow(2).sum(1)
        ratio = w_rows.sum() / g_rows.sum().clamp_min(1e-30)
        var = var + beta * g_rows * ratio
    return (var.clamp_min(0.0) * (rho * rho / n)).sqrt()


@torch.no_grad()
def merged_row_norms_sq(
    w0: torch.Tensor, w0_rows: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||(W0 + s B A)_i||^2 for every row i without forming the m x n merged matrix:
    ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T (one pass over W0: W0 A^T)."""
    Af, Bf = A.float(), B.float()
    wa = (w0 @ A.mT.to(w0.dtype)).float()  # m x r
    cross = (wa * Bf).sum(1)
    quad = ((Bf @ (Af @ Af.mT)) * Bf).sum(1)
    return w0_rows + 2.0 * scaling * cross + scaling * scaling * quad


class GGPOHandle(PeftHandle):
    pairs: list[LoraPair]
    rho: float = 0.05
    beta: float = 0.5
    seed: int = 0
    generator: torch.Generator | None = None
    _backup: list[torch.Tensor]
    _grad_rows: list[torch.Tensor | None]
    _w0_rows: list[torch.Tensor] | None = None

    def on_step_start(self, step: int, model: nn.Module) -> None:
        if self._backup:  # a step that never reached after_backward: put the weights back first
            self._restore()
        weights = [p.base_weight for p in self.pairs]
        if self.generator is None or self.generator.device != weights[0].device:
            # made here, not at apply: the loop moves the model to its device after apply
            self.generator = torch.Generator(device=weights[0].device).manual_seed(self.seed)
        with torch.no_grad():
            if self._w0_rows is None or self._w0_rows[0].device != weights[0].device:
                # the base weights are frozen and restored exactly after every step
                self._w0_rows = [w.float().pow(2).sum(1) for w in weights]
            for p, w, w0_rows, g_rows in zip(self.pairs, weights, self._w0_rows, self._grad_rows,
                                             strict=True):
                rows = merged_row_norms_sq(w, w0_rows, p.A, p.B, p.scaling)
                std = _row_std(rows, w.shape[1], g_rows, self.rho, self.beta)
                noise = torch.randn(w.shape, generator=self.generator, device=w.device, dtype=w.dtype)
                self._backup.append(w.detach().clone())
                w.add_(noise.mul_(std[:, None].to(w.dtype)))

    def _restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.pairs, self._backup, strict=True):
                p.base_weight.copy_(saved)
        self._backup = []

    def after_backward(self, step: int, model: nn.Module) -> None:
        if not self._backup:  # a second backward in the same step (closure optimizers)
            return
        self._restore()
        self._grad_rows = [
            None if p.B.grad is None else p.B.grad.detach() / p.scaling for p in self.pairs
        ]


def apply_lora_ggpo(
    model: nn.Module, *, rho: float = 0.05, beta: float = 0.5, seed: int = 0, **lora_kwargs: Any
) -> GGPOHandle:
    base = apply_lora(model, name="lora_ggpo", **lora_kwargs)
    handle = GGPOHandle(name="lora_ggpo", model=base.model, merge_adapter=base.merge_adapter)
    handle.pairs = lora_pairs(handle.model)
    handle.rho, handle.beta, handle.seed = rho, beta, seed
    handle._backup = []
    handle._grad_rows = [None] * len(handle.pairs)
    return handle
