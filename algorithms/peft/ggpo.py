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
    """sigma_i for each row of the merged weight (see the module docstring)."""
    w = merged.float()
    n = w.shape[1]
    w_rows = w.pow(2).sum(1)
    var = w_rows if grad_rows is None else (1.0 - beta) * w_rows
    if grad_rows is not None and beta > 0.0:
        g_rows = grad_rows.float().pow(2).sum(1)
        ratio = w_rows.sum() / g_rows.sum().clamp_min(1e-30)
        var = var + beta * g_rows * ratio
    return (var * (rho * rho / n)).sqrt()


class GGPOHandle(PeftHandle):
    pairs: list[LoraPair]
    rho: float = 0.05
    beta: float = 0.5
    generator: torch.Generator
    _backup: list[torch.Tensor]
    _grad_rows: list[torch.Tensor | None]

    def on_step_start(self, step: int, model: nn.Module) -> None:
        self._backup = []
        with torch.no_grad():
            for p, g_rows in zip(self.pairs, self._grad_rows, strict=True):
                w = p.base_weight
                merged = w + p.scaling * (p.B @ p.A).to(w.dtype)
                std = ggpo_row_std(merged, g_rows, self.rho, self.beta)
                noise = torch.randn(
                    w.shape, generator=self.generator, device=w.device, dtype=torch.float32
                )
                self._backup.append(w.detach().clone())
                w.add_((noise * std[:, None]).to(w.dtype))

    def after_backward(self, step: int, model: nn.Module) -> None:
        with torch.no_grad():
            for p, saved in zip(self.pairs, self._backup, strict=True):
                p.base_weight.copy_(saved)
        self._backup = []
        self._grad_rows = [
            None if p.B.grad is None else p.B.grad.detach() / p.scaling for p in self.pairs
        ]


def apply_lora_ggpo(
    model: nn.Module, *, rho: float = 0.05, beta: float = 0.5, seed: int = 0, **lora_kwargs: Any
) -> GGPOHandle:
    base = apply_lora(model, name="lora_ggpo", **lora_kwargs)
    handle = GGPOHandle(name="lora_ggpo", model=base.model, merge_adapter=base.merge_adapter)
    handle.pairs = lora_pairs(handle.model)
    handle.rho, handle.beta = rho, beta
    device = handle.pairs[0].base_weight.device
    handle.generator = torch.Generator(device=device).manual_seed(seed)
    handle._backup = []
    handle._grad_rows = [None] * len(handle.pairs)
    return handle
