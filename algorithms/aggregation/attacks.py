"""Byzantine attacks on the gradient exchange: ``attack(honest[h, d], f, generator) -> [f, d]``.

The liars are omniscient, as in the papers: their rows are computed from the honest rows of the
same step. Every attack is coordinate-wise in the honest rows, so it can be applied to any
block of coordinates (a bucket, a shard) and gives the same rows as on the whole vector (the
Gaussian one draws fresh noise per block, from the generator it is given). ``label_flip`` is not
a gradient attack (its config's ``ACTS_ON`` is "data"): the liars train on flipped labels (the
task does it), so ``ATTACKS.build`` gives no function for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import torch
from torch import Tensor

from algorithms.aggregation import config as C
from algorithms.registry import Registry

AttackFn = Callable[[Tensor, int, torch.Generator], Tensor]


def _rows(v: Tensor, f: int) -> Tensor:
    return v.unsqueeze(0).expand(f, -1).clone()


def sign_flip(scale: float = 1.0) -> AttackFn:
    """Every liar sends ``-scale * mean(honest)`` (the authors' "reverse" attack uses scale 10)."""

    def attack(honest: Tensor, f: int, gen: torch.Generator) -> Tensor:
        return _rows(honest.mean(dim=0) * -scale, f)

    return attack


def gaussian(std: float = 1.0) -> AttackFn:
    """Every liar sends independent ``N(0, std^2)`` noise, drawn from ``gen`` (seeded per step)."""

    def attack(honest: Tensor, f: int, gen: torch.Generator) -> Tensor:
        shape = (f, honest.shape[1])
        if honest.device.type == "cpu":
            return torch.randn(shape, generator=gen, dtype=honest.dtype) * std
        # Drawing f*d numbers on the CPU and copying them is slow for big models: seed a generator
        # on the tensor's device from the given one instead (deterministic per device type).
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        dev_gen = torch.Generator(device=honest.device).manual_seed(seed)
        return torch.randn(shape, generator=dev_gen, dtype=honest.dtype, device=honest.device) * std

    return attack


def uniform(low: float = 0.0, high: float = 1.0) -> AttackFn:
    """Every liar sends independent ``U[low, high)`` numbers (the Flag authors' "random" attack draws
    ``U[0, 1)``: unlike zero-mean noise, all liars then point near the all-ones direction)."""

    def attack(honest: Tensor, f: int, gen: torch.Generator) -> Tensor:
        shape = (f, honest.shape[1])
        if honest.device.type == "cpu":
            u = torch.rand(shape, generator=gen, dtype=honest.dtype)
        else:  # as gaussian: a generator on the tensor's device, seeded from the given one
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            dev_gen = torch.Generator(device=honest.device).manual_seed(seed)
            u = torch.rand(shape, generator=dev_gen, dtype=honest.dtype, device=honest.device)
        return low + (high - low) * u

    return attack


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: ``s = floor(n/2 + 1) - f`` workers must be won over, and
    ``z = Phi^-1((n - s) / n)``."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return NormalDist().inv_cdf(p)


def alie(z: float | None = None) -> AttackFn:
    """A little is enough: every liar sends ``mean - z * std`` of the honest rows (per coordinate,
    sample std), ``z`` from the paper's formula for ``n = h + f`` unless given."""

    def attack(honest: Tensor, f: int, gen: torch.Generator) -> Tensor:
        h = honest.shape[0]
        zz = alie_z(h + f, f) if z is None else z
        mean = honest.mean(dim=0)
        std = honest.std(dim=0, unbiased=True) if h > 1 else torch.zeros_like(mean)
        return _rows(mean - zz * std, f)

    return attack


def ipm(epsilon: float = 0.1) -> AttackFn:
    """Inner-product manipulation (Xie et al. 2020): every liar sends ``-epsilon * mean(honest)``."""

    def attack(honest: Tensor, f: int, gen: torch.Generator) -> Tensor:
        return _rows(honest.mean(dim=0) * -epsilon, f)

    return attack


ATTACKS: Registry[C.AttackBase, AttackFn | None] = Registry("attack", C.AttackBase)
build_attack = ATTACKS.build_named
known = ATTACKS.names


@ATTACKS.register(C.SignFlipAttack)
def _sign_flip(cfg: C.SignFlipAttack) -> AttackFn:
    return sign_flip(cfg.scale)


@ATTACKS.register(C.GaussianAttack)
def _gaussian(cfg: C.GaussianAttack) -> AttackFn:
    return gaussian(cfg.std)


@ATTACKS.register(C.UniformAttack)
def _uniform(cfg: C.UniformAttack) -> AttackFn:
    return uniform(cfg.low, cfg.high)


@ATTACKS.register(C.ALIEAttack)
def _alie(cfg: C.ALIEAttack) -> AttackFn:
    return alie(cfg.z)


@ATTACKS.register(C.IPMAttack)
def _ipm(cfg: C.IPMAttack) -> AttackFn:
    return ipm(cfg.epsilon)


@ATTACKS.register(C.LabelFlipAttack)
def _label_flip(cfg: C.LabelFlipAttack) -> None:
    """A data attack: the liars send honest gradients of flipped labels; no gradient function."""
    return None


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """The label-flip attack's data: class ``k`` becomes ``num_classes - 1 - k``."""
    return num_classes - 1 - y
