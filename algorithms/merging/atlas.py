"""aTLAS (Zhang et al. 2024, "Knowledge composition using task vectors with learned anisotropic
scaling", eq. 2-3): theta = theta_base + sum_t Lambda_t tau_t, where Lambda_t is block diagonal with
one learned scalar per parameter block (here: per parameter tensor) and per task vector
(``blockwise=True``), or a single learned scalar per task vector (``blockwise=False``).

As in the authors' code (fredzzhang/atlas, ``src/composition.py``) the coefficients start at zero,
so the model starts at the base and moves away only as far as the objective asks;
``init="mean"`` (1/T, task arithmetic's mean of the task vectors) or a number starts elsewhere.
Only the coefficients are trained (AdamW with weight decay, as the authors; the decay pulls
unhelpful coefficients back to zero, i.e. to the base), on a small set: cross-entropy with labels
(few-shot; hard labels, or class probabilities as soft targets), a caller's
``loss_fn(model, batch)`` (e.g. a task's own loss), or, ``unlabelled=True``, the entropy of the
model's predictions (the paper's unsupervised objective for test-time adaptation). Buffers (e.g.
BatchNorm statistics) are taken from the base.

Defaults versus the authors' (``src/args.py``: AdamW, lr 1e-3, weight decay 0.1, a cosine schedule
with 500 warm-up steps over 10 epochs of a dataset, i.e. thousands of steps): weight decay is
theirs; the learning rate is 1e-2, constant, because the default budget here is 100 steps and Adam
moves a coefficient by about lr per step, so at 1e-3 the coefficients could not leave [-0.1, 0.1].
Pass ``lr=1e-3`` with a few thousand steps to follow the authors.

The composition runs in each parameter's dtype: a bf16 model is fitted in bf16 (the forward passes
see bf16 weights) and returned in bf16, and its task vectors are held in bf16, so no float32 copy
of the model and of every task vector is made behind the caller's back. The coefficients are
float32 (Adam's updates of about lr would be lost in bf16); base + sum_t c * tau_t is computed in
the parameter's dtype.
"""

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.merging._state import check_compatible, module_with_state
from algorithms.merging.adapters import unwrap_adapters
from algorithms.merging.base import Batch
from algorithms.merging.config import AtlasConfig
from algorithms.merging.task_arithmetic import require_base


class AtlasMerger:
    def __init__(
        self, cfg: AtlasConfig, loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    ) -> None:
        self.steps, self.lr, self.weight_decay, self.unlabelled = cfg.steps, cfg.lr, cfg.weight_decay, cfg.unlabelled
        self.init, self.blockwise = cfg.init, cfg.blockwise
        self.loss_fn = loss_fn  # used instead of cross-entropy when given (labelled mode)
        self.coefficients_: dict[str, torch.Tensor] = {}  # block name -> (n_tasks,) after merge()
        self.losses_: list[float] = []

    def _start(self, n_tasks: int) -> float:
        if self.init == "zero":
            return 0.0
        if self.init == "mean":
            return 1.0 / n_tasks
        return float(self.init)

    def merge(
        self, models: Sequence[nn.Module], base: nn.Module | None = None, data: Iterable[Batch] | None = None
    ) -> nn.Module:
        models, base = unwrap_adapters(models, base)
        base = require_base(base, "atlas")
        sds = check_compatible(models, base)
        base_sd = {k: v.detach() for k, v in base.state_dict().items()}
        params = {n for n, p in base.named_parameters() if p.is_floating_point()}
        blocks = sorted(params)
        taus = [{b: _difference(sd[b], base_sd[b]) for b in blocks} for sd in sds]
        shape = (len(taus), len(blocks)) if self.blockwise else (len(taus),)
        coef = torch.full(shape, self._start(len(taus)), requires_grad=True)

        template = copy.deepcopy(base)
        template.train(False)  # deterministic forward (no dropout) while fitting the coefficients
        for p in template.parameters():
            p.requires_grad_(False)
        buffers = {k: v for k, v in template.named_buffers()}

        def compose(c: torch.Tensor) -> dict[str, torch.Tensor]:
            """base + sum_t c_t[block] tau_t[block], in the block's dtype (c moved to its device)."""
            out = {}
            for j, b in enumerate(blocks):
                w = base_sd[b]
                cb = (c[:, j] if self.blockwise else c).to(w.device)
                out[b] = (w + sum(cb[t] * taus[t][b] for t in range(len(taus)))).to(w.dtype)
            return out

        self.losses_ = []
        if self.steps > 0:
            if data is None:
                raise ValueError("atlas: needs data to learn the coefficients (or steps=0)")
            batches = list(data)
            if not batches:
                raise ValueError("atlas: data is empty")
            opt = torch.optim.AdamW([coef], lr=self.lr, weight_decay=self.weight_decay)
            with_loss = _LossOf(template, self.loss_fn) if self.loss_fn is not None and not self.unlabelled else None
            for batch in itertools.islice(itertools.cycle(batches), self.steps):
                state = {**compose(coef), **buffers}
                if with_loss is not None:
                    loss = functional_call(with_loss, {f"model.{k}": v for k, v in state.items()}, (batch,))
                else:
                    args, kwargs, labels = _split(batch)
                    loss = self._loss(_logits(functional_call(template, state, args, kwargs)), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.losses_.append(float(loss.detach()))

        with torch.no_grad():
            final = compose(coef.detach())
        per_block = coef.detach() if self.blockwise else coef.detach()[:, None].expand(-1, len(blocks))
        self.coefficients_ = {b: per_block[:, j].clone() for j, b in enumerate(blocks)}
        alias = _tied_aliases(base)
        state = {
            k: final[alias.get(k, k)] if alias.get(k, k) in final else v.clone() for k, v in base_sd.items()
        }
        return module_with_state(base, state)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.unlabelled:
            logp = F.log_softmax(logits.float(), dim=-1)
            return -(logp.exp() * logp).sum(dim=-1).mean()
        if labels is None:
            raise ValueError("atlas: labelled training needs (inputs, labels) batches (or unlabelled=True)")
        if labels.is_floating_point():  # soft targets (class probabilities), e.g. a teacher's
            if labels.shape != logits.shape:
                raise ValueError(
                    f"atlas: soft targets of shape {tuple(labels.shape)} for logits {tuple(logits.shape)}"
                )
            logp = F.log_softmax(logits.float(), dim=-1)
            return -(labels.float() * logp).sum(dim=-1).mean()
        if logits.dim() == 3 and labels.dim() == 2:  # causal LM: predict token t+1 from prefix <= t
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )


def _difference(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tau = theta - base in the parameter's dtype, subtracted in at least float32 (exact for bf16
    inputs) one block at a time, so that no float32 copy of a whole task vector is held."""
    wide = torch.promote_types(base.dtype, torch.float32)
    return (theta.to(wide) - base.to(wide)).to(base.dtype)


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap the weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that share storage with an earlier one (tied embeddings) -> that name."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def _split(batch: Batch) -> tuple[tuple[object, ...], dict[str, object], torch.Tensor | None]:
    """(positional args, keyword args, labels) of one batch: a tensor, an (x, y) pair or a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        return (), kwargs, labels
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return (batch[0],), {}, batch[1]
    raise ValueError(f"atlas: unsupported batch type {type(batch).__name__} (tensor, (x, y) or dict)")


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"atlas: cannot find logits in the model's output ({type(out).__name__})")
