"""Registry of gradient codes: one dict name -> builder.

``build(scheme, n_workers, n_stragglers, **params)`` returns a :class:`GradientCode` for the
one-shot schemes and a :class:`SequentialCode` (round-based) for the sequential ones; for the
latter ``n_stragglers`` is ``lambda`` of the (B, W, lambda)-bursty model and ``params`` carries
``burst`` (B) and ``window`` (W).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from algorithms.coding.base import GradientCode, SequentialCode
from algorithms.coding.config import CodeBase
from algorithms.coding.multiplexed import MultiplexedSGC
from algorithms.coding.repetition import CyclicRepetition, FractionalRepetition
from algorithms.coding.sequential import SelectiveRepeatSGC

Code = GradientCode | SequentialCode
Builder = Callable[..., Any]

_REGISTRY: dict[str, Builder] = {}


def register(name: str, builder: Builder) -> None:
    if name in _REGISTRY:
        raise ValueError(f"gradient code {name!r} is already registered")
    _REGISTRY[name] = builder


def known() -> list[str]:
    return sorted(_REGISTRY)


def build(scheme: str, n_workers: int, n_stragglers: int, **params: Any) -> Code:
    if scheme not in _REGISTRY:
        raise ValueError(f"unknown gradient code {scheme!r}; known: {', '.join(known())}")
    code: Code = _REGISTRY[scheme](n_workers, n_stragglers, **params)
    return code


def build_from_config(cfg: CodeBase, n_workers: int) -> Code:
    """Build from a validated ``CodingConfig`` (see ``config.py``); checks ``n`` first."""
    cfg.validate_for(n_workers)
    # patience is the server's; seed no longer changes the (deterministic) codes
    params = cfg.model_dump(exclude={"scheme", "stragglers", "patience", "seed"})
    return build(cfg.scheme, n_workers, cfg.stragglers, **params)


def _sequential(cls: type) -> Builder:
    def make(n: int, lam: int, burst: int = 1, window: int = 2, n_jobs: int | None = None) -> Any:
        return cls(n, burst, window, lam, n_jobs=n_jobs)

    return make


register("fractional_repetition", FractionalRepetition)
register("cyclic_repetition", CyclicRepetition)
register("sequential_gc", _sequential(SelectiveRepeatSGC))
register("multiplexed_sgc", _sequential(MultiplexedSGC))
