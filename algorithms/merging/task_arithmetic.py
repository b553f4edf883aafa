"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", eq. 1 with addition):
theta = theta_base + lambda * sum_t tau_t, tau_t = theta_t - theta_base."""

from collections.abc import Iterable, Sequence

from torch import nn

from algorithms.merging._state import (
    StateDict,
    add_to_base,
    check_compatible,
    module_with_state,
    task_vectors,
)
from algorithms.merging.adapters import unwrap_adapters
from algorithms.merging.base import Batch
from algorithms.merging.config import TaskArithmeticConfig


def task_arithmetic_state_dicts(
    sds: Sequence[StateDict], base_sd: StateDict, scaling: float = 1.0
) -> StateDict:
    taus = task_vectors(list(sds), base_sd)
    delta = {k: scaling * sum(t[k] for t in taus) for k in taus[0]}
    return add_to_base(base_sd, delta)  # type: ignore[arg-type]


def require_base(base: nn.Module | None, method: str) -> nn.Module:
    if base is None:
        raise ValueError(f"{method}: needs a base model (the one the inputs were fine-tuned from)")
    return base


class TaskArithmeticMerger:
    def __init__(self, cfg: TaskArithmeticConfig) -> None:
        self.scaling = cfg.scaling

    def merge(
        self, models: Sequence[nn.Module], base: nn.Module | None = None, data: Iterable[Batch] | None = None
    ) -> nn.Module:
        models, base = unwrap_adapters(models, base)
        base = require_base(base, "task_arithmetic")
        sds = check_compatible(models, base)
        base_sd = {k: v.detach() for k, v in base.state_dict().items()}
        return module_with_state(base, task_arithmetic_state_dicts(sds, base_sd, self.scaling))
