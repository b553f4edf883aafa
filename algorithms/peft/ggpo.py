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
The row norms of W' are computed without forming W':
||W'_i||^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T, with those of the frozen W0
cached: per step the cost is one matmul W0 A^T per layer, the noise, and the copies.
Layers of equal shape are handled together (the GPU cost of many small kernels is their launch):
their statistics are computed batched, their noise is drawn in one call (layers in module
order), and the copies and the addition are multi-tensor (``torch._foreach_*``) kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from algorithms.peft.base import PeftHandle
from algorithms.peft.lora import LoraPair, apply_lora, lora_pairs


@dataclass
class _ShapeGroup:
    """Adapted layers of one shape, scaling, dtype and device (indices into the handle's pairs)."""

    idx: list[int]
    scaling: float
    w0_rows: torch.Tensor  # (L, m) squared row norms of the frozen base weights
    backup: list[torch.Tensor]  # one (m, n) buffer per layer, reused every step
    grad_rows: torch.Tensor | None = None  # (L, m) squared row norms of the last G


class GGPOHandle(PeftHandle):
    pairs: list[LoraPair]
    rho: float = 0.05
    beta: float = 0.5
    seed: int = 0
    generator: torch.Generator | None = None
    _shapes: list[_ShapeGroup] | None = None
    _perturbed: bool = False

    def _shape_groups(self, weights: list[torch.Tensor]) -> list[_ShapeGroup]:
        if self._shapes is not None and self._shapes[0].w0_rows.device == weights[0].device:
            return self._shapes
        keyed: dict[tuple[Any, ...], list[int]] = {}
        for i, (p, w) in enumerate(zip(self.pairs, weights, strict=True)):
            keyed.setdefault((tuple(w.shape), p.scaling, w.dtype, w.device), []).append(i)
        self._shapes = [
            _ShapeGroup(
                idx=idx,
                scaling=key[1],
                w0_rows=torch.stack([weights[i].float().pow(2).sum(1) for i in idx]),
                backup=[torch.empty_like(weights[i]) for i in idx],
            )
            for key, idx in keyed.items()
        ]
        return self._shapes

    @torch.no_grad()
    def on_step_start(self, step: int, model: nn.Module) -> None:
        if self._perturbed:  # a step that never reached after_backward: put the weights back first
            self._restore()
        weights = [p.base_weight for p in self.pairs]
        device = weights[0].device
        if self.generator is None or self.generator.device != device:
            # made here, not at apply: the loop moves the model to its device after apply
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # the base weights are frozen and restored exactly after every step: W0 stats are cached
        groups = self._shape_groups(weights)
        for grp in groups:
            ws = [weights[i] for i in grp.idx]
            A = torch.stack([self.pairs[i].A.detach() for i in grp.idx]).float()  # (L, r, n)
            B = torch.stack([self.pairs[i].B.detach() for i in grp.idx]).float()  # (L, m, r)
            wa = torch.stack([w @ self.pairs[i].A.detach().mT.to(w.dtype)
                              for i, w in zip(grp.idx, ws, strict=True)]).float()  # (L, m, r)
            s = grp.scaling
            rows = grp.w0_rows + 2.0 * s * (wa * B).sum(-1) + s * s * ((B @ (A @ A.mT)) * B).sum(-1)
            var = rows
            if grp.grad_rows is not None and self.beta > 0.0:
                ratio = rows.sum(-1, keepdim=True) / grp.grad_rows.sum(-1, keepdim=True).clamp_min(1e-30)
                var = (1.0 - self.beta) * rows + self.beta * grp.grad_rows * ratio
            m, n = ws[0].shape
            std = (var.clamp_min(0.0) * (self.rho * self.rho / n)).sqrt()  # (L, m)
            torch._foreach_copy_(grp.backup, ws)
            noise = torch.randn((len(ws), m, n), generator=self.generator, device=device, dtype=ws[0].dtype)
            noise.mul_(std[..., None].to(noise.dtype))
            torch._foreach_add_(ws, list(noise.unbind(0)))
        self._perturbed = True

    @torch.no_grad()
    def _restore(self) -> None:
        assert self._shapes is not None
        for grp in self._shapes:
            torch._foreach_copy_([self.pairs[i].base_weight for i in grp.idx], grp.backup)
        self._perturbed = False

    @torch.no_grad()
    def after_backward(self, step: int, model: nn.Module) -> None:
        if not self._perturbed:  # a second backward in the same step (closure optimizers)
            return
        self._restore()
        assert self._shapes is not None
        for grp in self._shapes:
            grads = [self.pairs[i].B.grad for i in grp.idx]
            if any(g is None for g in grads):
                grp.grad_rows = None
                continue
            # G = g^B_lora / s (m x r): its squared row norms
            g = torch.stack(grads).float() / grp.scaling  # type: ignore[arg-type]
            grp.grad_rows = g.pow(2).sum(-1)


def apply_lora_ggpo(
    model: nn.Module, *, rho: float = 0.05, beta: float = 0.5, seed: int = 0, **lora_kwargs: Any
) -> GGPOHandle:
    base = apply_lora(model, name="lora_ggpo", **lora_kwargs)
    handle = GGPOHandle(name="lora_ggpo", model=base.model, merge_adapter=base.merge_adapter)
    handle.pairs = lora_pairs(handle.model)
    handle.rho, handle.beta, handle.seed = rho, beta, seed
    return handle
