"""PLeaS support code: a model seen as a chain of weight layers and unit-wise operations.

PLeaS (Nasery et al. 2024) needs, for every weight layer, its inputs and outputs on data and a
notion of "unit" (a neuron of a Linear layer, a channel of a Conv2d) that permutations act on.
We read an ``nn.Sequential`` (nested Sequentials allowed) as its leaves in order: weight layers
(``Linear``, ``Conv2d`` with groups=1) separated by parameter-free operations that act on each unit
independently (activations, dropout, pooling) or only reshape (``Flatten``). Such an operation
commutes with any permutation of units, which is what lets a merged layer keep its own unit
order. Normalisation layers and residual blocks are not covered (they would need their own
permutation groups).
"""

from dataclasses import dataclass

import torch
from torch import nn

WEIGHT_TYPES = (nn.Linear, nn.Conv2d)
UNITWISE_TYPES = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus, nn.Mish,
    nn.Identity, nn.Dropout, nn.Flatten,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


@dataclass
class Chain:
    names: list[str]  # dotted names of the leaves, in forward order
    leaves: list[nn.Module]
    weight_idx: list[int]  # positions of the weight layers among the leaves

    def weight(self, j: int) -> nn.Linear | nn.Conv2d:
        layer = self.leaves[self.weight_idx[j]]
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        return layer

    def run(self, x: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Apply the leaves [0, stop) to x (the whole model if stop is None)."""
        for leaf in self.leaves[: len(self.leaves) if stop is None else stop]:
            x = leaf(x)
        return x


def parse_chain(model: nn.Module) -> Chain:
    """The chain of an ``nn.Sequential``; a clear ValueError for anything PLeaS cannot merge here."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"pleas: supports nn.Sequential models of Linear/Conv2d layers, got {type(model).__name__}"
        )
    names: list[str] = []
    leaves: list[nn.Module] = []
    for name, mod in model.named_modules():
        if len(list(mod.children())) > 0:
            if not isinstance(mod, nn.Sequential):
                raise ValueError(f"pleas: container {name!r} ({type(mod).__name__}) is not an nn.Sequential")
            continue
        names.append(name)
        leaves.append(mod)
    weight_idx = [i for i, m in enumerate(leaves) if isinstance(m, WEIGHT_TYPES)]
    if not weight_idx:
        raise ValueError("pleas: the model has no Linear or Conv2d layer")
    for i, (name, mod) in enumerate(zip(names, leaves, strict=True)):
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
            raise ValueError(f"pleas: {name!r}: only Conv2d with groups=1 and zero padding is supported")
        if isinstance(mod, WEIGHT_TYPES):
            continue
        if isinstance(mod, nn.Unflatten) and i < weight_idx[0]:
            continue  # reshaping the raw input is fine
        if not isinstance(mod, UNITWISE_TYPES) or any(True for _ in mod.parameters(recurse=False)):
            raise ValueError(
                f"pleas: {name!r} ({type(mod).__name__}) is not a parameter-free unit-wise operation "
                "(normalisation layers, attention and residual blocks are not supported)"
            )
    return Chain(names, leaves, weight_idx)


def units_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def as_units(t: torch.Tensor, c: int) -> torch.Tensor:
    """View features with ``c`` units on dim 1 as (N, c, rest): a Linear input after Flatten of
    conv maps is (N, c * S) with the channel the slow index, as torch's Flatten lays it out."""
    if t.shape[1] == c:
        return t if t.dim() > 2 else t.unsqueeze(-1)
    if t.dim() == 2 and t.shape[1] % c == 0:
        return t.view(t.shape[0], c, -1)
    raise ValueError(f"pleas: features of shape {tuple(t.shape)} do not split into {c} units")


def unit_samples(t: torch.Tensor, c: int) -> torch.Tensor:
    """(samples, c): every example and position is a sample of each unit's activation."""
    return as_units(t, c).movedim(1, -1).reshape(-1, c)


def replace_leaf(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = root.get_submodule(dotted.rpartition(".")[0]) if "." in dotted else root
    setattr(parent, dotted.rpartition(".")[2], new)


def capture(chain: Chain, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and outputs of every weight layer on x."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        for leaf in chain.leaves:
            if isinstance(leaf, WEIGHT_TYPES):
                ins.append(x)
                x = leaf(x)
                outs.append(x)
            else:
                x = leaf(x)
    return ins, outs
