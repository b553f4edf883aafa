"""LoRA-SB (Ponkshe, Singhal et al., 2024, "Initialization using Update Approximation is a Silver
Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv 2411.19557).

Architecture (LoRA-XS): W = W0 + s B R A with B (m x r) and A (r x n) fixed and only the r x r
core R trained. Initialisation: approximate the first full fine-tuning update,
dW = -init_lr * G with G the full gradient of W averaged over ``init_batches`` batches, take its
truncated SVD U S V^T and set B = U_r, A = V_r^T, R = S_r / s, so that the initial adapter
s B R A is the best rank-r approximation of dW (Eckart-Young). With B and A orthonormal, every
later update of R stays the optimal low-rank projection of the full update (their Theorem),
which is why no scaling factor needs tuning.

The paper derives the first step from the optimizer's first update; we use the plain gradient
step (their "update approximation" with SGD), which is what the init hyperparameter sets.

peft has no LoRA-XS layer, so the adapted layers are peft LoRA layers whose ``lora_A`` is a
:class:`CoreA` module (x -> R A x, its ``weight`` property is R @ A) and whose ``lora_B`` weight
is the fixed B. peft's forward and merge only read ``lora_A.weight`` / call ``lora_A(x)``, so they
work unchanged. On save, each ``CoreA`` is folded into a plain ``nn.Linear`` with weight R @ A:
the saved adapter is an ordinary peft LoRA adapter (lora_A = R A, lora_B = B), loadable by
``peft.PeftModel.from_pretrained`` with no Orchestra code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.peft.base import LossFn, PeftHandle, default_loss_fn
from algorithms.peft.lora import InitBatches, LoraPair, _take, apply_lora, lora_pairs


class CoreA(nn.Module):
    """x -> R (A x): fixed A (buffer), trainable r x r core R."""

    def __init__(self, A: torch.Tensor, R: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.R = nn.Parameter(R)

    @property
    def weight(self) -> torch.Tensor:
        return self.R @ self.A  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.R)  # type: ignore[arg-type]


def full_gradients(
    model: nn.Module, pairs: list[LoraPair], batches: list[Any], loss_fn: LossFn
) -> list[torch.Tensor]:
    """Mean gradient of each adapted base weight over ``batches`` (B = 0, so W = W0)."""
    weights = [p.base_weight for p in pairs]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    for batch in batches:
        (loss_fn(model, batch) / len(batches)).backward()
    grads = [w.grad.detach().clone() for w in weights]  # type: ignore[union-attr]
    for w, flag in zip(weights, flags, strict=True):
        w.grad = None
        w.requires_grad_(flag)
    model.zero_grad(set_to_none=True)
    return grads


def fold_cores(model: nn.Module) -> list[tuple[nn.ModuleDict, str, CoreA]]:
    """Replace every ``CoreA`` of ``model`` by a frozen ``nn.Linear`` with weight R @ A (a plain
    LoRA ``lora_A``); returns what ``unfold_cores`` needs to put them back."""
    swapped = []
    for mod in list(model.modules()):
        if isinstance(mod, nn.ModuleDict):
            for key, core in list(mod.items()):
                if isinstance(core, CoreA):
                    weight = core.weight.detach().clone()
                    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                    device=weight.device, dtype=weight.dtype)
                    lin.weight = nn.Parameter(weight, requires_grad=False)
                    mod[key] = lin
                    swapped.append((mod, key, core))
    return swapped


def unfold_cores(swapped: list[tuple[nn.ModuleDict, str, CoreA]]) -> None:
    for mod, key, core in swapped:
        mod[key] = core


class LoRASBHandle(PeftHandle):
    pairs: list[LoraPair]

    @contextlib.contextmanager
    def _folded(self, model: nn.Module) -> Iterator[None]:
        """Temporarily make every layer a standard LoRA layer (lora_A = R A, lora_B = B)."""
        swapped = fold_cores(model)
        try:
            yield
        finally:
            unfold_cores(swapped)

    def save_adapter(self, model: nn.Module, path: str | Path) -> Path:
        with self._folded(self.model):
            return super().save_adapter(model, path)

    def merge_into_base(self, model: nn.Module) -> nn.Module:
        fold_cores(self.model)
        return super().merge_into_base(model)


def apply_lora_sb(
    model: nn.Module,
    *,
    init_batches: int = 1,
    init_lr: float = 1e-3,
    batches: InitBatches = None,
    loss_fn: LossFn = default_loss_fn,
    **lora_kwargs: Any,
) -> LoRASBHandle:
    data = _take(batches, init_batches)
    base = apply_lora(model, name="lora_sb", **lora_kwargs)
    peft_model = base.model
    pairs = lora_pairs(peft_model)
    grads = full_gradients(peft_model, pairs, data, loss_fn)
    with torch.no_grad():
        for p, g in zip(pairs, grads, strict=True):
            r = p.A.shape[0]
            U, S, Vh = torch.linalg.svd(-init_lr * g.float(), full_matrices=False)
            dtype, device = p.A.dtype, p.A.device
            core = CoreA(
                Vh[:r].to(device=device, dtype=dtype),
                torch.diag(S[:r] / p.scaling).to(device=device, dtype=dtype),
            )
            p.layer.lora_A["default"] = core
            p.B.copy_(U[:, :r].to(p.B.dtype))
            p.B.requires_grad_(False)
            p.A = core.R  # the trainable tensor of this layer is now the core
    handle = LoRASBHandle(name="lora_sb", model=peft_model, merge_adapter=base.merge_adapter)
    handle.pairs = pairs
    return handle
