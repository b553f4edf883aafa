"""Interfaces of the gradient-coding family.

Two kinds of code live here:

* :class:`GradientCode` -- a one-shot code in the sense of Tandon et al., "Gradient Coding:
  Avoiding Stragglers in Distributed Learning" (ICML 2017): the data of one step is split into
  ``k`` parts, worker ``i`` sends ``sum_j B[i, j] * g_j`` and the server decodes the full gradient
  ``sum_j g_j`` from any ``n - s`` workers with a vector ``a`` (zero on missing workers) such that
  ``a @ B = 1``.
* :class:`SequentialCode` -- a round-based code in the sense of Krishnan, Ebrahimi and Khisti,
  "Sequential Gradient Coding for Straggler Mitigation" (ICLR 2023): job ``t`` (one gradient)
  starts in round ``t`` and must be decodable by the end of round ``t + T``; in each round every
  worker runs a list of :class:`Task` (linear combinations of parts of some job).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


class UndecodableError(RuntimeError):
    """The results that arrived do not determine the full gradient."""


@runtime_checkable
class GradientCode(Protocol):
    """A one-shot gradient code: ``B`` is ``n_workers x n_parts``."""

    n_workers: int
    n_stragglers: int

    @property
    def B(self) -> torch.Tensor: ...

    @property
    def n_parts(self) -> int: ...

    def parts(self, worker: int) -> list[int]:
        """Data parts that ``worker`` must compute (the support of row ``worker`` of ``B``)."""
        ...

    def decode(self, alive: Sequence[int]) -> torch.Tensor:
        """Vector ``a`` over workers (zero off ``alive``) with ``a @ B == 1``; raises
        :class:`UndecodableError` when ``alive`` is not enough."""
        ...

    @property
    def load(self) -> float:
        """Normalised computational load: the largest fraction of the data one worker processes."""
        ...


@dataclass(frozen=True)
class Task:
    """One unit of work in a round: ``sum_p coeff_p * g_job[p]`` over parts of job ``job``."""

    job: int
    coeffs: tuple[tuple[int, float], ...]
    kind: str = "coded"  # "coded", "uncoded" or "repeat": informative only

    @property
    def parts(self) -> list[int]:
        return [p for p, _ in self.coeffs]


TaskKey = tuple[int, int, int]
"""(round, worker, slot): where a task's result came from; ``slot`` indexes the worker's list."""


@runtime_checkable
class SequentialCode(Protocol):
    """A round-based code: call ``assign(r)``, run the tasks, then ``complete(r, alive)``."""

    n_workers: int
    delay: int  # T

    @property
    def n_parts(self) -> int: ...

    @property
    def part_fractions(self) -> tuple[float, ...]:
        """Fraction of one job's data held by each part (they sum to 1)."""
        ...

    def assign(self, round: int) -> list[list[Task]]: ...

    def complete(self, round: int, alive: Sequence[int]) -> list[int]:
        """Record which workers returned round ``round``; return jobs that became decodable."""
        ...

    def decodable(self, job: int) -> bool: ...

    def job_weights(self, job: int) -> dict[TaskKey, float]:
        """Weights ``w`` with ``sum_key w[key] * result[key] == sum_p g_job[p]``."""
        ...

    def conforms(self, round: int, stragglers: Sequence[int]) -> bool:
        """Would declaring ``stragglers`` in ``round`` keep the pattern inside the scheme's
        straggler model (so that every job still meets its deadline)?"""
        ...

    @property
    def load(self) -> float:
        """Largest fraction of one job's data that a worker processes in one round, measured
        from the tasks the scheme assigns."""
        ...
