"""State-dict helpers shared by the parameter-space mergers (average, task arithmetic, TIES, aTLAS).

These mergers see a model only through its ``state_dict``: any ``nn.Module`` works (an MLP, an HF
transformers model, a peft model) as long as every input has the same keys and shapes. Floating
entries are merged; integer/bool entries (step counters, position ids) are copied from the
reference model (the base if there is one, else the first input).
"""

import copy
from collections.abc import Sequence

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


def check_compatible(models: Sequence[nn.Module], base: nn.Module | None = None) -> list[StateDict]:
    """The inputs' state dicts (detached), after checking they have the same keys and shapes."""
    if len(models) < 1:
        raise ValueError("merge needs at least one model")
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    ref = {k: v.detach() for k, v in base.state_dict().items()} if base is not None else sds[0]
    for i, sd in enumerate(sds):
        if sd.keys() != ref.keys():
            missing = sorted(ref.keys() - sd.keys())[:5]
            extra = sorted(sd.keys() - ref.keys())[:5]
            raise ValueError(f"model {i}: state_dict keys differ (missing {missing}, extra {extra})")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ValueError(
                    f"model {i}: {k!r} has shape {tuple(v.shape)}, expected {tuple(ref[k].shape)}"
                )
    return sds


def is_mergeable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def module_with_state(template: nn.Module, state: StateDict) -> nn.Module:
    """A deep copy of ``template`` carrying ``state`` (each entry cast to the template's dtype)."""
    out = copy.deepcopy(template)
    own = out.state_dict()
    out.load_state_dict({k: v.to(dtype=own[k].dtype, device=own[k].device) for k, v in state.items()})
    return out


def task_vectors(sds: list[StateDict], base_sd: StateDict) -> list[StateDict]:
    """tau_t = theta_t - theta_base for every mergeable entry, in float32 (or wider)."""
    return [{k: _wide(sd[k]) - _wide(b) for k, b in base_sd.items() if is_mergeable(b)} for sd in sds]


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)


def add_to_base(base_sd: StateDict, delta: StateDict) -> StateDict:
    """base + delta on mergeable entries; other entries copied from the base."""
    return {k: (_wide(b) + delta[k]) if k in delta else b.clone() for k, b in base_sd.items()}
