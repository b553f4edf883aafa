"""LoRA-SB (Ponkshe, Singhal et al., 2024, "Initialization using Update Approximation is a Silver
Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv 2411.19557).

Architecture (LoRA-XS): W = W0 + s B R A with B (m x r) and A (r x n) fixed and only the r x r
core R trained. Initialisation, as the authors': approximate the first full fine-tuning update by
dW = -init_lr * sign(G), G the sum of the full gradients of W over ``init_samples`` training samples
(the authors use 50 to 170; 170 is their code's default), take its truncated SVD U S V^T and set
B = U_r, A = V_r^T and R = S_r / s, so that the initial adapter s B R A is the best rank-r
approximation of dW (Eckart-Young; the authors' R = S_r, with their s = 1). Adam's first update
is lr * sign(g), which the sign matches; ``init_update="gradient"`` uses the plain SGD step
dW = -init_lr * mean gradient instead. With B and A orthonormal, every later update of R stays
the optimal low-rank projection of the full update (their Theorem), which is why no scaling
factor needs tuning.

The samples are the first ``init_samples`` of the batches handed over (the last batch is cut);
the worker fetches enough batches for them (``init_batches`` caps that number). Each batch's loss
is weighted by its share of the samples, so that for a loss that is a mean over samples G is
the per-sample sum up to a positive factor (which the sign ignores) and the mean for "gradient"
(with a token-averaged LM loss, samples weigh by their token count, where the authors' per-sample
backward weighs them equally).

peft has no LoRA-XS layer, so the adapted layers are peft LoRA layers whose ``lora_A`` is a
:class:`CoreA` module (x -> R A x, its ``weight`` property is R @ A) and whose ``lora_B`` weight
is the fixed B. peft's forward and merge only read ``lora_A.weight`` / call ``lora_A(x)``, so they
work unchanged. On save, each ``CoreA`` is folded into a plain ``nn.Linear`` with weight R @ A:
the saved adapter is an ordinary peft LoRA adapter (lora_A = R A, lora_B = B), loadable by
``peft.PeftModel.from_pretrained`` with no Orchestra code.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.peft.base import LossFn, PeftHandle, default_loss_fn
from algorithms.peft.lora import InitBatches, LoraPair, apply_lora, lora_pairs


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


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (dict, tuple or tensor batches)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0])


def _head(batch: Any, n: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:n] for v in batch)
    return batch[:n]


def take_samples(batches: InitBatches, n: int, max_batches: int | None = None) -> list[Any]:
    """The first ``n`` samples of ``batches`` (at most ``max_batches`` of them), the last batch cut;
    fewer (with a warning) when the batches hold fewer."""
    if batches is None:
        raise ValueError("this method needs init_batches (a few training batches) to initialise")
    taken, count = [], 0
    for batch in itertools.islice(iter(batches), max_batches):
        size = batch_size(batch)
        taken.append(batch if count + size <= n else _head(batch, n - count))
        count += min(size, n - count)
        if count >= n:
            break
    if not taken:
        raise ValueError("init_batches is empty")
    if count < n:
        warnings.warn(f"lora_sb: init_samples is {n} but the init batches hold {count} samples: using "
                      f"{count}", stacklevel=2)
    return taken


def full_gradients(
    model: nn.Module, pairs: list[LoraPair], batches: list[Any], loss_fn: LossFn
) -> list[torch.Tensor]:
    """Gradient of each adapted base weight (B = 0, so W = W0) of the loss averaged over the
    samples of ``batches`` (each batch's loss weighted by its share of the samples)."""
    weights = [p.base_weight for p in pairs]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    total = sum(batch_size(b) for b in batches)
    for batch in batches:
        (loss_fn(model, batch) * (batch_size(batch) / total)).backward()
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
    init_samples: int,
    init_batches: int | None,
    init_update: Literal["sign", "gradient"],
    init_lr: float,
    batches: InitBatches = None,
    loss_fn: LossFn = default_loss_fn,
    **lora_kwargs: Any,
) -> LoRASBHandle:
    """``init_samples`` samples from ``batches`` (at most ``init_batches`` batches) estimate the
    first update: -init_lr * sign(gradient) (the authors'), or -init_lr * gradient."""
    if init_update not in ("sign", "gradient"):
        raise ValueError(f"init_update must be 'sign' or 'gradient', not {init_update!r}")
    data = take_samples(batches, init_samples, init_batches)
    base = apply_lora(model, name="lora_sb", **lora_kwargs)
    peft_model = base.model
    pairs = lora_pairs(peft_model)
    grads = full_gradients(peft_model, pairs, data, loss_fn)
    with torch.no_grad():
        for p, g in zip(pairs, grads, strict=True):
            r = p.A.shape[0]
            step = torch.sign(g.float()) if init_update == "sign" else g.float()
            U, S, Vh = torch.linalg.svd(-init_lr * step, full_matrices=False)
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
