"""Merging PEFT adapters by their weight deltas.

An input wrapped by HF peft (a ``PeftModel`` with LoRA-style layers) is the frozen base W0 plus
a delta per adapted layer (LoRA: scaling * B @ A). Merging adapters means merging those deltas,
not the A and B factors separately (the mean of B_i A_i is not the product of means). So each
such input is folded into a dense copy W0 + delta (peft's ``merge_and_unload``), and, when no base
is given, the base is the shared frozen model (peft's ``unload``: the adapters removed, not folded).
The task vectors of the parameter-space mergers are then exactly the adapters' deltas, and the
merged model is a dense model of the base's architecture.

Duck-typed (no peft import): a model with ``merge_and_unload`` and ``unload`` methods is an
adapter-wrapped model.
"""

import copy
from collections.abc import Sequence

import torch
from torch import nn


def is_adapter_model(model: nn.Module) -> bool:
    return callable(getattr(model, "merge_and_unload", None)) and callable(getattr(model, "unload", None))


def fold_adapter(model: nn.Module) -> nn.Module:
    """A dense copy with the adapter deltas added to the base weights (the input is untouched)."""
    return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]


def frozen_base(model: nn.Module) -> nn.Module:
    """A copy of the frozen base under the adapters."""
    return copy.deepcopy(model).unload()  # type: ignore[operator]


def unwrap_adapters(
    models: Sequence[nn.Module], base: nn.Module | None
) -> tuple[list[nn.Module], nn.Module | None]:
    """Dense inputs (and a base) for the parameter-space mergers; plain models pass through."""
    if not any(is_adapter_model(m) for m in models):
        return list(models), (frozen_base(base) if base is not None and is_adapter_model(base) else base)
    if not all(is_adapter_model(m) for m in models):
        raise ValueError("merge: either every input is a PEFT adapter model or none is")
    if base is None:
        bases = [frozen_base(m) for m in models]
        ref = bases[0].state_dict()
        for i, other in enumerate(bases[1:], start=1):
            sd = other.state_dict()
            if sd.keys() != ref.keys() or any(not torch.equal(sd[k], ref[k]) for k in ref):
                raise ValueError(
                    f"merge: the adapters of inputs 0 and {i} sit on different base weights; "
                    "give merge.base (the model they were fine-tuned from)"
                )
        base = bases[0]
    elif is_adapter_model(base):
        base = frozen_base(base)
    return [fold_adapter(m) for m in models], base
