"""The robust step's parts shared by the ranks' gradient exchange (``workers.exchange``) and the
parameter server: the spec's aggregation rule, and the simulated Byzantine workers (who lies and
what they send).

Every rank (and the server) draws the same lies: the attack's generator is seeded per step from
the spec's seed, and per coordinate block when a gradient is attacked block by block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from service.spec import ExperimentSpec
from workers.faults import attack_generator, chosen_ranks


def build_rule(spec: ExperimentSpec) -> Any:
    """The spec's aggregation rule (``mean`` when it names none)."""
    from algorithms.aggregation.config import MeanConfig
    from algorithms.aggregation.registry import RULES

    return RULES.build(spec.distributed.aggregator or MeanConfig(name="mean"))


class Liars:
    """The workers of ``faults.byzantine`` and their gradient attack (none for ``label_flip``,
    whose liars lie through their data instead)."""

    def __init__(self, spec: ExperimentSpec, world: int) -> None:
        self.spec = spec.faults.byzantine
        self.ranks = chosen_ranks(self.spec, world)
        self.attack: Any = None
        if self.spec is not None and self.ranks:
            from algorithms.aggregation.attacks import ATTACKS

            self.attack = ATTACKS.build(self.spec.attack)  # None for a data attack (label_flip)

    def among(self, workers: list[int]) -> list[int]:
        """The positions in ``workers`` of those who send attacked gradients."""
        if self.attack is None:
            return []
        return [i for i, w in enumerate(workers) if w in self.ranks]

    def replace(self, rows: Tensor, liars: list[int], step: int, offset: int = 0) -> Tensor:
        """``rows`` (one per worker) with the rows at ``liars`` replaced by the attack's, computed
        from the others; ``offset``: the first coordinate of the block, for a per-block seed."""
        if not liars or self.attack is None:
            return rows
        gen = attack_generator(self.spec, step)
        if offset:
            base = int(torch.randint(0, 2**62, (1,), generator=gen))
            gen.manual_seed((base ^ (offset * 0x9E3779B1)) & (2**63 - 1))
        honest = [i for i in range(rows.shape[0]) if i not in liars]
        rows[liars] = self.attack(rows[honest], len(liars), gen).to(rows.dtype)
        return rows
