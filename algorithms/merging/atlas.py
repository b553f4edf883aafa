"""aTLAS (Zhang et al. 2024, "Knowledge composition using task vectors with learned anisotropic
scaling", eq. 2-3): theta = theta_base + sum_t Lambda_t tau_t, where Lambda_t is block diagonal with
one learned scalar per parameter block (here: per parameter tensor) and per task vector.

Only the coefficients are trained (Adam), on a small set: cross-entropy with labels (few-shot; hard
labels, or class probabilities as soft targets), a caller's ``loss_fn(model, batch)`` (e.g. a task's
own loss), or, ``unlabelled=True``, the entropy of the model's predictions (the paper's
unsupervised objective for test-time adaptation). Buffers (e.g. BatchNorm statistics) are taken
from the base.
"""

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.merging._state import check_compatible, module_with_state, task_vectors
from algorithms.merging.adapters import unwrap_adapters
from algorithms.merging.base import Batch
from algorithms.merging.task_arithmetic import require_base


class AtlasMerger:
    def __init__(
        self,
        steps: int = 100,
        lr: float = 1e-2,
        unlabelled: bool = False,
        init: float | None = None,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    ) -> None:
        if steps < 0:
            raise ValueError(f"steps: must be >= 0, got {steps}")
        self.steps, self.lr, self.unlabelled, self.init = steps, lr, unlabelled, init
        self.loss_fn = loss_fn  # used instead of cross-entropy when given (labelled mode)
        self.coefficients_: dict[str, torch.Tensor] = {}  # block name -> (n_tasks,) after merge()
        self.losses_: list[float] = []

    def merge(
        self, models: Sequence[nn.Module], base: nn.Module | None = None, data: Iterable[Batch] | None = None
    ) -> nn.Module:
        models, base = unwrap_adapters(models, base)
        base = require_base(base, "atlas")
        sds = check_compatible(models, base)
        base_sd = {k: v.detach() for k, v in base.state_dict().items()}
        params = {n for n, p in base.named_parameters() if p.is_floating_point()}
        taus = [{k: v for k, v in t.items() if k in params} for t in task_vectors(sds, base_sd)]
        blocks = sorted(params)
        init = self.init if self.init is not None else 1.0 / len(models)
        coef = torch.full((len(taus), len(blocks)), float(init), requires_grad=True)

        template = copy.deepcopy(base).float()
        template.train(False)  # deterministic forward (no dropout) while fitting the coefficients
        for p in template.parameters():
            p.requires_grad_(False)
        buffers = {k: v for k, v in template.named_buffers()}
        base_f = {k: base_sd[k].float() for k in blocks}

        def compose(c: torch.Tensor) -> dict[str, torch.Tensor]:
            return {
                b: base_f[b] + sum(c[t, j] * taus[t][b] for t in range(len(taus)))
                for j, b in enumerate(blocks)
            }

        self.losses_ = []
        if self.steps > 0:
            if data is None:
                raise ValueError("atlas: needs data to learn the coefficients (or steps=0)")
            batches = list(data)
            if not batches:
                raise ValueError("atlas: data is empty")
            opt = torch.optim.Adam([coef], lr=self.lr)
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
        self.coefficients_ = {b: coef.detach()[:, j].clone() for j, b in enumerate(blocks)}
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
