"""Registry of gradient codes: config class -> builder of a code for ``n_workers``.

``CODES.build(cfg, n_workers)`` (``n_jobs``, the rounds a sequential code plans for, may follow)
returns a :class:`GradientCode` for the one-shot schemes and a :class:`SequentialCode`
(round-based) for the sequential ones, whose ``stragglers`` is ``lambda`` of the
(B, W, lambda)-bursty model with ``burst`` (B) and ``window`` (W). The spec has already checked
the code against its number of workers (``CodeBase.validate_for``).
"""

from __future__ import annotations

from typing import Any

from algorithms.coding import config as C
from algorithms.coding.base import GradientCode, SequentialCode
from algorithms.coding.multiplexed import MultiplexedSGC
from algorithms.coding.repetition import CyclicRepetition, FractionalRepetition
from algorithms.coding.sequential import SelectiveRepeatSGC
from algorithms.registry import Registry

Code = GradientCode | SequentialCode
CODES: Registry[C.CodeBase, Code] = Registry("gradient code", C.CodeBase)
known = CODES.names


def build(scheme: str, n_workers: int, n_stragglers: int, n_jobs: int | None = None, **fields: Any) -> Code:
    """``CODES.build`` from a scheme name, ``s`` (or ``lambda``) and the config's other fields."""
    return CODES.build(CODES.config(scheme, stragglers=n_stragglers, **fields), n_workers, n_jobs)


@CODES.register(C.FractionalRepetitionConfig)
def _fractional(cfg: C.FractionalRepetitionConfig, n_workers: int, n_jobs: int | None = None) -> Code:
    return FractionalRepetition(n_workers, cfg.stragglers)


@CODES.register(C.CyclicRepetitionConfig)
def _cyclic(cfg: C.CyclicRepetitionConfig, n_workers: int, n_jobs: int | None = None) -> Code:
    return CyclicRepetition(n_workers, cfg.stragglers)


@CODES.register(C.SequentialGCConfig)
def _sequential_gc(cfg: C.SequentialGCConfig, n_workers: int, n_jobs: int | None = None) -> Code:
    return SelectiveRepeatSGC(n_workers, cfg.burst, cfg.window, cfg.stragglers, n_jobs=n_jobs)


@CODES.register(C.MultiplexedSGCConfig)
def _multiplexed_sgc(cfg: C.MultiplexedSGCConfig, n_workers: int, n_jobs: int | None = None) -> Code:
    return MultiplexedSGC(n_workers, cfg.burst, cfg.window, cfg.stragglers, n_jobs=n_jobs)
