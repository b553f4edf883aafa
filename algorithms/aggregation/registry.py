"""Registry of aggregation rules: config class -> builder of a :class:`~algorithms.aggregation.base.Rule`.

``RULES.build(cfg)`` (or ``RULES.build(cfg, chunk)``: coordinates per block, an execution option,
not a hyperparameter) returns a callable ``agg(grads[n, d]) -> [d]`` batched on the tensor's
device; ``build(name, chunk=None, **fields)`` does the same from a name.
"""

from __future__ import annotations

from typing import Any

from algorithms.aggregation import config as C
from algorithms.aggregation.base import Rule
from algorithms.aggregation.coordinate import Mean, Median, TrimmedMean
from algorithms.aggregation.flag import Flag
from algorithms.aggregation.geomed import GeometricMedian
from algorithms.aggregation.krum import Bulyan, Krum, MultiKrum
from algorithms.registry import Registry, fields_of

RULES: Registry[C.RuleBase, Rule] = Registry("aggregation rule", C.RuleBase)
known = RULES.names


def build(name: str, chunk: int | None = None, **fields: Any) -> Rule:
    return RULES.build(RULES.config(name, **fields), chunk)


def _rule(cls: type[Rule]) -> Any:
    def make(cfg: C.RuleBase, chunk: int | None = None) -> Rule:
        return cls(**fields_of(cfg), **({"chunk": chunk} if chunk is not None else {}))

    return make


for _config, _cls in ((C.MeanConfig, Mean), (C.MedianConfig, Median), (C.TrimmedMeanConfig, TrimmedMean),
                      (C.KrumConfig, Krum), (C.MultiKrumConfig, MultiKrum), (C.BulyanConfig, Bulyan),
                      (C.GeometricMedianConfig, GeometricMedian), (C.FlagConfig, Flag)):
    RULES.register(_config, _rule(_cls))
