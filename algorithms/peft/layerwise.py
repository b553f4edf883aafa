"""LISA and OwLore: full-weight fine-tuning of a few sampled transformer layers at a time.

LISA (Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning", Algorithm 1): the embeddings and the head (everything outside the
stack of transformer blocks) are always trained; every ``interval`` steps ``n_layers`` of the
N blocks are sampled uniformly without replacement and only those are trained until the next
resampling; the other blocks are frozen (requires_grad False, so no gradient and no optimizer
state is touched for them).

OwLore (Li et al., 2024, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for
Memory-Efficient LLM Fine-tuning"): the same schedule, but block l is sampled with probability
p_l proportional to its outlier ratio D_l (OWL's layerwise outlier distribution: the fraction
of weights whose score |W_ij| * ||X_j|| exceeds ``outlier_threshold`` times the block's mean
score; ||X_j|| is the input feature norm over ``init_batches`` batches when given, else 1), and
the sampled blocks' matrices are updated with GaLore's low-rank projected Adam (rank,
update_proj_gap, scale) instead of full Adam, which is what bounds the optimizer memory.

Defaults are the authors': LISA 2 blocks every 20 steps; OwLore 5 blocks every 50 steps, GaLore
rank 256, projector refreshed every 100 steps, scale 1.0 (their scripts and finetuner).

Sampling: the blocks of period k = step // interval are drawn from a generator seeded with
(seed, k), so a run restored from a checkpoint mid-period trains the same blocks as the run it
continues. The first period is drawn at ``apply`` (the trainable-parameter count logged before
training is then the real one).

OwLore's GaLore update runs inside ``optimizer.step()`` through the step hooks of
``optim_hooks.py``: for each sampled matrix it reads ``lr``, ``betas``, ``eps`` and
``weight_decay`` from the optimizer's live group holding it (so a schedule applies), updates the
matrix, and clears its gradient so that the optimizer itself skips it. The projected moments
live in the optimizer's ``state[p]`` (``owlore_*`` keys), so they are checkpointed with it; they
are dropped when a new period starts (as in OwLore: newly sampled blocks start fresh).

Multi-worker DDP is not supported: DDP registers the parameters that require gradients when it
wraps the model, and LISA changes that set as it goes (the worker refuses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.peft import optim_hooks
from algorithms.peft.base import InitBatches, PeftHandle
from algorithms.peft.galore_proj import PREFIX, galore_adam_step
from algorithms.peft.lora import _take


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList of same-class children with most params."""
    best: nn.ModuleList | None = None
    best_size = 0
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            if len({type(c) for c in mod}) != 1:
                continue
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = mod, size
    if best is None:
        raise ValueError("no stack of transformer blocks (nn.ModuleList) found in the model")
    return best


class LISAHandle(PeftHandle):
    blocks: nn.ModuleList
    n_layers: int = 2
    interval: int = 20
    seed: int = 0
    probs: torch.Tensor
    active: list[int]
    period: int = -1

    def sample(self, period: int) -> list[int]:
        """The blocks trained in period ``period`` (a pure function of seed and period)."""
        k = min(self.n_layers, len(self.blocks))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + period)
        idx = torch.multinomial(self.probs, k, replacement=False, generator=gen)
        return sorted(int(i) for i in idx)

    def _set_active(self, active: list[int]) -> None:
        for i, block in enumerate(self.blocks):
            on = i in active
            for p in block.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None
        self.active = active

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        # Every parameter is given to the optimizer; frozen ones simply have no gradient.
        self._groups = [{"params": list(self.model.parameters()), "lr": lr}]
        return self._groups

    def on_step_start(self, step: int, model: nn.Module) -> None:
        period = step // self.interval
        if period != self.period:
            self.period = period
            self._set_active(self.sample(period))

    def save_adapter(self, model: nn.Module, path: str | Path) -> Path:
        """Full-weight methods: the whole model, ``save_pretrained`` format (not a peft adapter)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))  # type: ignore[operator]
        return out

    def merge_into_base(self, model: nn.Module) -> nn.Module:
        return self.model


class OwLoreHandle(LISAHandle):
    rank: int = 256
    update_proj_gap: int = 100
    scale: float = 1.0

    def _matrices(self, blocks: list[int] | None = None) -> list[nn.Parameter]:
        idx = range(len(self.blocks)) if blocks is None else blocks
        return [p for i in idx for p in self.blocks[i].parameters() if p.dim() == 2]

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        mats = {id(p) for p in self._matrices()}
        rest = [p for p in self.model.parameters() if id(p) not in mats]
        self._groups = [{"params": rest, "lr": lr}, {"params": self._matrices(), "lr": lr}]
        return self._groups

    @torch.no_grad()
    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        active = {id(p): p for p in self._matrices(self.active) if p.grad is not None}
        if not active:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in active:
                    continue
                state = optimizer.state[p]
                if state.get("owlore_period") != self.period:  # newly sampled: fresh moments
                    for key in [k for k in state if k.startswith(PREFIX)]:
                        del state[key]
                    state["owlore_period"] = self.period
                betas = group.get("betas", (0.9, 0.999))
                galore_adam_step(
                    p, p.grad, state, rank=self.rank, update_proj_gap=self.update_proj_gap,
                    scale=self.scale, lr=float(group["lr"]),
                    betas=(float(betas[0]), float(betas[1])), eps=float(group.get("eps", 1e-8)),
                    weight_decay=float(group.get("weight_decay", 0.0)),
                )
                p.grad = None  # the optimizer's own update skips it

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        return None


@torch.no_grad()
def outlier_ratios(
    model: nn.Module, blocks: nn.ModuleList, threshold: float, batches: list[Any] | None
) -> torch.Tensor:
    """OWL's layerwise outlier ratio D_l for each block (see the module docstring)."""
    norms: dict[nn.Linear, torch.Tensor] = {}
    handles = []
    if batches:

        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sq = x.pow(2).sum(0)
            norms[mod] = norms[mod] + sq if mod in norms else sq  # type: ignore[index]

        for block in blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    handles.append(m.register_forward_hook(hook))
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
        for h in handles:
            h.remove()
    ratios = []
    for block in blocks:
        scores = []
        for m in block.modules():
            if isinstance(m, nn.Linear):
                s = m.weight.detach().float().abs()
                if m in norms:
                    s = s * norms[m].sqrt()[None, :]
                scores.append(s.flatten())
        allscores = torch.cat(scores)
        ratios.append((allscores > threshold * allscores.mean()).float().mean())
    return torch.stack(ratios)


def _common(handle: LISAHandle, n_layers: int, interval: int, seed: int) -> None:
    handle.blocks = find_blocks(handle.model)
    handle.n_layers, handle.interval, handle.seed = n_layers, interval, seed
    for p in handle.model.parameters():
        p.requires_grad_(True)


def apply_lisa(
    model: nn.Module,
    *,
    n_layers: int,
    interval: int,
    seed: int,
    task_type: str | None = None,
) -> LISAHandle:
    handle = LISAHandle(name="lisa", model=model)
    _common(handle, n_layers, interval, seed)
    handle.probs = torch.full((len(handle.blocks),), 1.0 / len(handle.blocks))
    handle.on_step_start(0, model)
    return handle


def apply_owlore(
    model: nn.Module,
    *,
    n_layers: int,
    interval: int,
    outlier_threshold: float,
    rank: int,
    update_proj_gap: int,
    scale: float,
    init_batches: int,
    batches: InitBatches = None,
    seed: int,
    task_type: str | None = None,
) -> OwLoreHandle:
    handle = OwLoreHandle(name="owlore", model=model)
    _common(handle, n_layers, interval, seed)
    data = _take(batches, init_batches) if init_batches and batches is not None else None
    was_training = model.training
    model.eval()
    ratios = outlier_ratios(model, handle.blocks, outlier_threshold, data)
    model.train(was_training)
    # a floor keeps blocks with no outlier sampleable (multinomial needs n_layers nonzero entries)
    ratios = ratios.clamp_min(1e-6)
    handle.probs = ratios / ratios.sum()
    handle.rank, handle.update_proj_gap, handle.scale = rank, update_proj_gap, scale
    handle.on_step_start(0, model)
    optim_hooks.attach(handle)
    return handle
