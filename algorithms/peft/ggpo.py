"""LoRA-GGPO (Chang et al., 2025, arXiv 2502.14538), as its authors released it: LoRA-MGPO
(code: llm172/LoRA-MGPO; the paper's v2), a momentum-guided perturbation of the base weights.

Per adapted layer (W' = W0 + s B A, B: m x r, A: r x n, s the LoRA scaling), before the forward
pass the frozen base weight is moved to W0 + eps with

    v    = s (m_B A + B m_A)
    eps  = -rho * v / (||v||_F + 1e-12) * min(10, 1 / (gbar + 1e-12))

where m_A, m_B are the optimizer's first moments of A and B (AdamW's ``exp_avg``, SGD's
``momentum_buffer``): v is the momentum seen in the weight space of W', and the perturbation points
*against* it. gbar is an exponential moving average (factor ``beta``) of the layer's gradient norm
in the same space, ||s (g_B A + B g_A)||_F, updated after every backward from the gradient taken
at the perturbed point; its first value is the first norm itself, and while it does not exist the
factor is 1. A layer whose moments do not exist yet (the first step: the optimizer has no state
before its first update) is not perturbed. After backward the base weight is put back, then the
optimizer steps: one forward/backward per step, no SAM-style second pass.

This replaces an earlier reading of the paper's v1 (random Gaussian perturbations scaled by
weight and gradient row norms, with a ``seed``), which was not the authors' released rule.

The authors' profiles: NLU rho 0.05, beta 0.9 (with AdamW beta1 0.9); NLG rho 0.01, beta 0.8
(with AdamW beta1 0.8). The defaults are the NLU profile (``config.LoRAGGPOConfig``).

Mechanics:

- The handle finds the optimizer through torch's optimizer step hooks (``optim_hooks.py``): after
  each step of an optimizer that holds the LoRA tensors it keeps a weak reference to it, and reads
  its live ``state`` at the next ``on_step_start``. ``use_optimizer`` names it directly (after a
  checkpoint restore the first step is otherwise not perturbed; gbar is not checkpointed and starts
  afresh: the authors' trainer does not save it either).
- The perturbation is removed by restoring a saved copy, which is exact in any dtype (W + eps - eps
  is not, in bf16); it is added with two ``addmm_`` per layer, so no m x n temporary is formed.
- The norms of v and of the gradient come from r x r products only:
  ||P A + B Q||^2 = <P^T P, A A^T> + 2 <B^T P, Q A^T> + <B^T B, Q Q^T> (Frobenius products), batched
  over the layers of one shape; nothing waits on the host.
- The gradient norm is the one ``after_backward`` sees: before clipping (as the authors' trainer),
  and with fp16 loss scaling it would be scaled by the loss scale, so the worker refuses lora_ggpo
  with fp16 (``workers/peft_hooks.py``).

Data-parallel ranks see the same all-reduced gradients and hold the same optimizer state, so they
apply the same perturbation (no randomness is involved).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from algorithms.peft import optim_hooks
from algorithms.peft.base import PeftHandle
from algorithms.peft.lora import LoraPair, apply_lora, lora_pairs

CLAMP = 10.0  # the authors' cap on the factor 1 / gbar
EPS = 1e-12


def lowrank_sum_norm(P: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """||P A + B Q||_F over the leading (layer) dim, from r x r products (module docstring)."""
    sq = ((P.mT @ P) * (A @ A.mT)).sum((-2, -1))
    sq = sq + 2.0 * ((B.mT @ P) * (Q @ A.mT)).sum((-2, -1))
    sq = sq + ((B.mT @ B) * (Q @ Q.mT)).sum((-2, -1))
    return sq.clamp_min(0.0).sqrt()


def first_moment(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """The optimizer's first moment of ``param`` (AdamW ``exp_avg``, SGD ``momentum_buffer``)."""
    state = optimizer.state.get(param)
    if not state:
        return None
    moment = state.get("exp_avg")
    if moment is None:
        moment = state.get("momentum_buffer")
    return moment if isinstance(moment, torch.Tensor) else None


@dataclass
class _ShapeGroup:
    """Adapted layers of one shape, scaling and device (indices into the handle's pairs)."""

    idx: list[int]
    scaling: float
    gbar: torch.Tensor  # (L,) EMA of the gradient norm
    seen: torch.Tensor  # (L,) bool: gbar exists
    backup: list[torch.Tensor] = field(default_factory=list)  # base weights saved while perturbed
    perturbed: bool = False


def _stack_or_zeros(tensors: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(t if t is not None else torch.zeros_like(x)).float()
                        for t, x in zip(tensors, like, strict=True)])


class GGPOHandle(PeftHandle):
    pairs: list[LoraPair]
    rho: float  # set by apply_lora_ggpo, from the config
    beta: float
    _shapes: list[_ShapeGroup] | None = None
    _optimizer: weakref.ref[torch.optim.Optimizer] | None = None
    _holds: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]
    _pending: bool = False  # on_step_start ran and its after_backward has not yet
    _warned: bool = False

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the moments from ``optimizer`` from now on (the step hook does it by itself after
        the optimizer's first step)."""
        self._optimizer = weakref.ref(optimizer)

    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        held = self._holds.get(optimizer)
        if held is None:
            first = self.pairs[0].A
            held = any(p is first for g in optimizer.param_groups for p in g["params"])
            self._holds[optimizer] = held
        if held:
            self._optimizer = weakref.ref(optimizer)

    def _shape_groups(self) -> list[_ShapeGroup]:
        device = self.pairs[0].A.device
        if self._shapes is not None and self._shapes[0].gbar.device == device:
            return self._shapes
        # made here, not at apply: the loop moves the model to its device after apply
        keyed: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(self.pairs):
            keyed.setdefault((tuple(p.A.shape), tuple(p.B.shape), p.scaling, p.A.device), []).append(i)
        self._shapes = [
            _ShapeGroup(idx=idx, scaling=key[2], gbar=torch.zeros(len(idx), device=key[3]),
                        seen=torch.zeros(len(idx), dtype=torch.bool, device=key[3]))
            for key, idx in keyed.items()
        ]
        return self._shapes

    @torch.no_grad()
    def on_step_start(self, step: int, model: nn.Module) -> None:
        if any(g.perturbed for g in self._shapes or []):  # a step that never reached after_backward
            self._restore()
        self._pending = True
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is None:
            return
        found = False
        for grp in self._shape_groups():
            pairs = [self.pairs[i] for i in grp.idx]
            m_A = [first_moment(optimizer, p.A) for p in pairs]
            m_B = [first_moment(optimizer, p.B) for p in pairs]
            # a layer missing either moment gets v = 0, hence eps = 0: it is not perturbed
            present = [a is not None and b is not None for a, b in zip(m_A, m_B, strict=True)]
            if not any(present):
                continue
            found = True
            m_A = [a if ok else None for a, ok in zip(m_A, present, strict=True)]
            m_B = [b if ok else None for b, ok in zip(m_B, present, strict=True)]
            A = torch.stack([p.A.detach().float() for p in pairs])  # (L, r, n)
            B = torch.stack([p.B.detach().float() for p in pairs])  # (L, m, r)
            MA = _stack_or_zeros(m_A, [p.A for p in pairs])
            MB = _stack_or_zeros(m_B, [p.B for p in pairs])
            s = grp.scaling
            v_norm = s * lowrank_sum_norm(MB, A, B, MA)
            factor = torch.where(grp.seen, (1.0 / (grp.gbar + EPS)).clamp(max=CLAMP), 1.0)
            coef = -self.rho * s * factor / (v_norm + EPS)  # eps = coef * (m_B A + B m_A)
            weights = [p.base_weight for p in pairs]
            if not grp.backup:
                grp.backup = [torch.empty_like(w) for w in weights]
            torch._foreach_copy_(grp.backup, weights)
            dt = weights[0].dtype
            cMB, cMA = (coef[:, None, None] * MB).to(dt), (coef[:, None, None] * MA).to(dt)
            A, B = A.to(dt), B.to(dt)
            for k, w in enumerate(weights):
                w.addmm_(cMB[k], A[k]).addmm_(B[k], cMA[k])
            grp.perturbed = True
        if not found and not self._warned and optimizer.state:
            self._warned = True
            warnings.warn("lora_ggpo: the optimizer keeps no first moment (exp_avg or momentum_buffer) "
                          "of the LoRA tensors, so nothing is perturbed (plain LoRA)", stacklevel=2)

    @torch.no_grad()
    def _restore(self) -> None:
        for grp in self._shapes or []:
            if grp.perturbed:
                torch._foreach_copy_([self.pairs[i].base_weight for i in grp.idx], grp.backup)
                grp.perturbed = False

    @torch.no_grad()
    def after_backward(self, step: int, model: nn.Module) -> None:
        if not self._pending:  # a second backward in the same step (closure optimizers)
            return
        self._pending = False
        self._restore()
        for grp in self._shape_groups():
            pairs = [self.pairs[i] for i in grp.idx]
            has = [p.A.grad is not None and p.B.grad is not None for p in pairs]
            if not any(has):
                continue
            A = torch.stack([p.A.detach().float() for p in pairs])
            B = torch.stack([p.B.detach().float() for p in pairs])
            GA = _stack_or_zeros([p.A.grad if ok else None for p, ok in zip(pairs, has, strict=True)],
                                 [p.A for p in pairs])
            GB = _stack_or_zeros([p.B.grad if ok else None for p, ok in zip(pairs, has, strict=True)],
                                 [p.B for p in pairs])
            norm = grp.scaling * lowrank_sum_norm(GB, A, B, GA)
            mask = torch.tensor(has, device=grp.gbar.device)
            ema = torch.where(grp.seen, self.beta * grp.gbar + (1.0 - self.beta) * norm, norm)
            grp.gbar = torch.where(mask, ema, grp.gbar)
            grp.seen = grp.seen | mask

    def gbar(self) -> list[float | None]:
        """Each layer's gradient-norm EMA (None before its first backward), in module order; for
        logs and tests (one host sync)."""
        out: list[float | None] = [None] * len(self.pairs)
        for grp in self._shapes or []:
            for k, i in enumerate(grp.idx):
                if bool(grp.seen[k]):
                    out[i] = float(grp.gbar[k])
        return out


def apply_lora_ggpo(
    model: nn.Module, *, rho: float, beta: float, **lora_kwargs: Any
) -> GGPOHandle:
    base = apply_lora(model, name="lora_ggpo", **lora_kwargs)
    handle = GGPOHandle(name="lora_ggpo", model=base.model, merge_adapter=base.merge_adapter)
    handle.pairs = lora_pairs(handle.model)
    handle.rho, handle.beta = rho, beta
    handle._holds = weakref.WeakKeyDictionary()
    optim_hooks.attach(handle)
    return handle
