"""Gradient exchange under ``ddp``: all-gather of the flattened gradients, then the spec's rule.

Plain ``mean`` without attacks needs none of this: DDP's bucketed all-reduce does it. With a
robust rule or simulated Byzantine workers, every rank gathers all n gradients (n x d), replaces
the Byzantine rows by the attack (seeded per step, so every rank computes the same rows), and
applies the rule; every rank then holds the same aggregate.
"""

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from service.spec import ExperimentSpec
from workers.faults import attack_generator, chosen_ranks

Exchange = Callable[[nn.Module, int], dict[str, float]]


def _params(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class GatherExchange:
    def __init__(self, spec: ExperimentSpec, rank: int, world: int) -> None:
        from algorithms.aggregation.registry import build_from_config
        from algorithms.aggregation.config import MeanConfig

        agg_cfg = spec.distributed.aggregator or MeanConfig(name="mean")
        self.rule = build_from_config(agg_cfg)
        self.world, self.rank = world, rank
        self.byz_spec = spec.faults.byzantine
        self.byzantine = chosen_ranks(self.byz_spec, world)
        self.honest = [r for r in range(world) if r not in self.byzantine]
        self.attack = None
        if self.byz_spec is not None and self.byz_spec.attack.name != "label_flip" and self.byzantine:
            from algorithms.aggregation.attacks import build_attack_from_config

            self.attack = build_attack_from_config(self.byz_spec.attack)

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        params = _params(model)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        gathered = torch.empty(self.world, flat.numel(), dtype=flat.dtype, device=flat.device)
        if self.world > 1:
            dist.all_gather_into_tensor(gathered, flat.contiguous())
        else:
            gathered[0] = flat
        if self.attack is not None:
            honest = gathered[self.honest]
            gen = attack_generator(self.byz_spec, step)
            gathered[self.byzantine] = self.attack(honest, len(self.byzantine), gen).to(gathered.dtype)
        t0 = time.perf_counter()
        agg = self.rule(gathered.float()).to(flat.dtype)
        if agg.is_cuda:
            torch.cuda.synchronize()
        out = {"exchange/rule_ms": (time.perf_counter() - t0) * 1000.0}
        if self.byzantine:
            from algorithms.aggregation.base import liar_weight

            out["exchange/liar_weight"] = float(liar_weight(gathered.float(), agg.float(), self.byzantine))
        offset = 0
        for p in params:
            n = p.numel()
            grad = agg[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            offset += n
        return out


def build_exchange(spec: ExperimentSpec, *, rank: int, world: int) -> Exchange | None:
    agg = spec.distributed.aggregator
    byz = spec.faults.byzantine
    gradient_attack = byz is not None and byz.n > 0 and byz.attack.name != "label_flip"
    if (agg is None or agg.name == "mean") and not gradient_attack:
        return None
    return GatherExchange(spec, rank, world)
