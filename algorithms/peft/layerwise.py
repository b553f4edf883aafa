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

OwLore's GaLore update runs inside ``after_backward`` (it is an optimizer step on those
matrices, reading ``lr`` and ``weight_decay`` from their own parameter group so a schedule still
applies), then their gradients are cleared so that the loop's optimizer skips them. Moments are
dropped when a block is no longer sampled (as in OwLore: the sampled blocks' states are fresh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.peft.base import InitBatches, PeftHandle
from algorithms.peft.galore_proj import LowRankAdamState, galore_adam_step
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
    probs: torch.Tensor
    generator: torch.Generator
    active: list[int]

    def _sample(self) -> list[int]:
        k = min(self.n_layers, len(self.blocks))
        idx = torch.multinomial(self.probs, k, replacement=False, generator=self.generator)
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
        if step % self.interval == 0:
            self._set_active(self._sample())

    def save_adapter(self, model: nn.Module, path: str | Path) -> Path:
        """Full-weight methods: the whole model, ``save_pretrained`` format (not a peft adapter)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))  # type: ignore[operator]
        return out


class OwLoreHandle(LISAHandle):
    rank: int = 8
    update_proj_gap: int = 200
    scale: float = 0.25
    states: dict[int, LowRankAdamState]

    def _matrices(self, blocks: list[int] | None = None) -> list[nn.Parameter]:
        idx = range(len(self.blocks)) if blocks is None else blocks
        return [p for i in idx for p in self.blocks[i].parameters() if p.dim() == 2]

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        mats = {id(p) for p in self._matrices()}
        rest = [p for p in self.model.parameters() if id(p) not in mats]
        self._groups = [
            {"params": rest, "lr": lr},
            {"params": self._matrices(), "lr": lr, "owlore_galore": True},
        ]
        return self._groups

    def _set_active(self, active: list[int]) -> None:
        super()._set_active(active)
        self.states = {}

    def after_backward(self, step: int, model: nn.Module) -> None:
        group = next((g for g in self._groups if g.get("owlore_galore")), {})
        lr = float(group.get("lr", 0.0))
        betas = tuple(group.get("betas", (0.9, 0.999)))
        for p in self._matrices(self.active):
            if p.grad is None:
                continue
            self.states[id(p)] = galore_adam_step(
                p.data,
                p.grad,
                self.states.get(id(p)),
                step=step,
                rank=self.rank,
                update_proj_gap=self.update_proj_gap,
                scale=self.scale,
                lr=lr,
                betas=(float(betas[0]), float(betas[1])),
                eps=float(group.get("eps", 1e-8)),
                weight_decay=float(group.get("weight_decay", 0.0)),
            )
            p.grad = None


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
    handle.n_layers, handle.interval = n_layers, interval
    handle.generator = torch.Generator().manual_seed(seed)
    handle.active = []
    for p in handle.model.parameters():
        p.requires_grad_(True)
    handle._set_active([])  # frozen until the first on_step_start samples


def apply_lisa(
    model: nn.Module,
    *,
    n_layers: int = 2,
    interval: int = 20,
    seed: int = 0,
    task_type: str | None = None,
) -> LISAHandle:
    handle = LISAHandle(name="lisa", model=model)
    _common(handle, n_layers, interval, seed)
    handle.probs = torch.full((len(handle.blocks),), 1.0 / len(handle.blocks))
    return handle


def apply_owlore(
    model: nn.Module,
    *,
    n_layers: int = 2,
    interval: int = 20,
    outlier_threshold: float = 7.0,
    rank: int = 8,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    init_batches: int = 0,
    batches: InitBatches = None,
    seed: int = 0,
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
    handle.states = {}
    return handle

