"""The merging registry: method name -> builder of a ``Merger``.

``build("ties", density=0.3)`` or ``build_from_config(spec.merge)`` (the pydantic section of a
spec with ``task.kind: merge``). Methods register themselves below with one explicit call each.
"""

from collections.abc import Callable
from typing import Any

from algorithms.merging.atlas import AtlasMerger
from algorithms.merging.average import AverageMerger
from algorithms.merging.base import Merger
from algorithms.merging.config import MergeBase
from algorithms.merging.pleas import PleasMerger
from algorithms.merging.task_arithmetic import TaskArithmeticMerger
from algorithms.merging.ties import TiesMerger

Builder = Callable[..., Merger]

_REGISTRY: dict[str, Builder] = {}


def register(name: str, builder: Builder) -> None:
    if name in _REGISTRY:
        raise ValueError(f"merging method {name!r} is already registered")
    _REGISTRY[name] = builder


def known() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **hparams: Any) -> Merger:
    if name not in _REGISTRY:
        raise ValueError(f"unknown merging method {name!r}; known: {', '.join(known())}")
    return _REGISTRY[name](**hparams)


def build_from_config(cfg: MergeBase) -> Merger:
    """A merger from the spec's ``merge`` section (its hyperparameters; inputs are resolved by the caller)."""
    return build(cfg.method, **cfg.hparams())


register("average", AverageMerger)
register("task_arithmetic", TaskArithmeticMerger)
register("ties", TiesMerger)
register("pleas", PleasMerger)
register("atlas", AtlasMerger)
