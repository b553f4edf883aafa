"""How a step's data is split into parts and which worker computes what (the code, if any)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.spec import ExperimentSpec

Coeffs = tuple[tuple[int, float], ...]
WorkItem = tuple[int, Coeffs]  # (job, ((part, coefficient), ...))


def part_sizes(fractions: Sequence[float], total: int) -> list[int]:
    """Samples per part: ``fractions`` of ``total``, rounded by largest remainder (sum exact)."""
    raw = [f * total for f in fractions]
    sizes = [math.floor(r + 1e-9) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (sizes[i] - raw[i], i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) < 1:
        raise ValueError(f"train.batch_size {total} leaves a data part empty ({len(sizes)} parts)")
    return sizes


@dataclass
class Layout:
    """The code (if any), the data parts and how messages travel."""

    n_workers: int
    mode: str  # "uncoded" | "one_shot" | "sequential"
    sizes: list[int]
    code: Any = None
    stragglers: int = 0  # s of a one-shot code
    patience: float = 0.5
    wire: torch.dtype = torch.float32
    keep: int = 2  # batches each worker keeps per part (a job's parts are used up to T rounds late)

    @classmethod
    def from_spec(cls, spec: ExperimentSpec) -> Layout:
        from algorithms.coding.decode import unit_weights
        from algorithms.coding.registry import CODES

        assert spec.train is not None
        n, batch = spec.distributed.num_workers, spec.train.batch_size
        cfg = spec.distributed.gradient_coding
        if cfg is None:
            return cls(n, "uncoded", part_sizes([1.0 / n] * n, batch))
        code: Any = CODES.build(cfg, n)
        wire = torch.float32 if unit_weights(code) else torch.float64
        if hasattr(code, "assign"):  # a sequential code
            code.n_jobs = spec.train.max_steps
            return cls(n, "sequential", part_sizes(list(code.part_fractions), batch), code=code,
                       patience=float(getattr(cfg, "patience", 0.5)), wire=wire, keep=code.delay + 2)
        return cls(n, "one_shot", part_sizes([1.0 / code.n_parts] * code.n_parts, batch), code=code,
                   stragglers=cfg.stragglers, wire=wire)

    @property
    def n_parts(self) -> int:
        return len(self.sizes)

    def one_shot_items(self, worker: int, step: int) -> list[WorkItem]:
        if self.mode == "uncoded":
            return [(step, ((worker, 1.0),))]
        B = self.code.B
        return [(step, tuple((j, float(B[worker, j])) for j in self.code.parts(worker)))]

    def samples(self, coeffs: Coeffs) -> float:
        """``sum_p c_p * size_p``: how many samples a message's summed loss weighs."""
        return sum(c * self.sizes[p] for p, c in coeffs)
