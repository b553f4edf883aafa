"""Registry of aggregation rules: one dict name -> class.

``build(name, **params)`` returns a :class:`~algorithms.aggregation.base.Rule`, a callable
``agg(grads[n, d]) -> [d]`` batched on the tensor's device; ``build_from_config(cfg)`` builds
from a validated ``AggregatorConfig`` (``config.py``).
"""

from __future__ import annotations

from typing import Any

from algorithms.aggregation.base import Rule
from algorithms.aggregation.coordinate import Mean, Median, TrimmedMean
from algorithms.aggregation.flag import Flag
from algorithms.aggregation.geomed import GeometricMedian
from algorithms.aggregation.krum import Bulyan, Krum, MultiKrum

_REGISTRY: dict[str, type[Rule]] = {}


def register(name: str, cls: type[Rule]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"aggregation rule {name!r} is already registered")
    _REGISTRY[name] = cls


def known() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **params: Any) -> Rule:
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregation rule {name!r}; known: {', '.join(known())}")
    return _REGISTRY[name](**params)


def build_from_config(cfg: Any, **runtime: Any) -> Rule:
    """``runtime``: execution-only options (``chunk``), not hyperparameters."""
    return build(cfg.name, **cfg.model_dump(exclude={"name"}), **runtime)


for _cls in (Mean, Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, Flag):
    register(_cls.name, _cls)
