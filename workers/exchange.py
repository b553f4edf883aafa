"""Gradient exchange between backward and the optimizer step: the spec's aggregation rule over
every worker's gradient, with the simulated Byzantine workers' rows replaced by the attack.

Plain ``mean`` without attacks needs none of this: DDP's (or DeepSpeed's) all-reduce does it.

Two layouts, chosen by ``distributed.exchange`` (``workers.plan.RunPlan.exchange``, which also
decides whether an exchange runs at all; ``auto``, the default, takes the first under ddp and the
second under deepspeed, either may be named under both):

* ``gather`` -> :class:`GatherExchange`: the flattened gradient is all-gathered in buckets of
  ``bucket_elems`` coordinates (memory ``world x bucket``, not ``world x d``); every rank applies
  the attack and the rule to each bucket and ends with the same aggregate. Coordinate-wise rules
  (mean, median, trimmed mean) finish in one pass. The others (Krum, Multi-Krum, Bulyan, the
  geometric median, Flag) need the whole vectors, but only through their ``n x n`` Gram matrix,
  which is a sum over coordinate blocks: pass 1 gathers the buckets and sums their Gram
  matrices, the rule decides in worker space, pass 2 gathers the buckets again and applies the
  decision. When the gathered gradients fit in ``keep_elems`` (``world x d`` values, 2 GiB of
  fp32 by default), or are one bucket, pass 1 keeps its buckets and pass 2 gathers nothing; otherwise
  pass 2 gathers the buckets again, so memory stays bounded at twice the communication.
* ``shard`` -> :class:`ShardExchange`, a robust reduce-scatter: an all-to-all sends shard
  ``j`` of every rank's gradient to rank ``j``, so each rank holds all ``n`` workers' values of the
  shard it owns (``d`` numbers, as many as its own gradient); it aggregates that shard, and an
  all-gather assembles the aggregate (the same traffic as a ring all-reduce). Coordinate-wise
  rules are exact per shard. For the Gram-based rules each rank computes its shard's partial
  Gram matrix, one all-reduce of ``n x n`` numbers sums them, and every rank makes the same
  decision: the result equals the full-vector rule (up to float summation order), with no
  ``n x d`` buffer anywhere. ``exact_shards=False`` instead decides per shard from the local Gram
  (no extra all-reduce; Krum may then pick a different worker per shard): a blockwise rule, not
  the rule (its cosine to the exact one was measured on the digits task: 0.23-0.96 by rule and attack).

With ZeRO 1/2 the optimizer only needs its own partition of the gradient; the final all-gather is
kept because the loop hands a full ``p.grad`` to the engine.

Every rank computes the same Byzantine rows: the attack is seeded per step (and per block for the
Gaussian noise) from the spec's seed. Metrics: ``exchange/rule_ms`` (the rule alone, the
collectives excluded), ``exchange/comm_ms`` and, when someone lies, ``exchange/liar_weight``
(the liars' share of the aggregate, :func:`algorithms.aggregation.base.liar_weight`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from service.spec import ExperimentSpec
from workers.plan import ExchangeLayout
from workers.robust import Liars, build_rule

Exchange = Callable[[nn.Module, int], dict[str, float]]

DEFAULT_BUCKET = 1 << 24  # coordinates per all-gather bucket (x world x 4 bytes of buffer)
DEFAULT_KEEP = 1 << 29  # gathered values (world x d) the Gram-based rules may keep between passes: 2 GiB


def _params(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _write_back(params: list[torch.nn.Parameter], agg: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        grad = agg[offset:offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = grad.clone()
        else:
            p.grad.copy_(grad)
        offset += n


def _all_gather(out: Tensor, inp: Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
    gather(out, inp)


def _sync(t: Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


class _RobustExchange:
    """What both layouts share: the rule and the liars (``workers.robust``)."""

    def __init__(self, spec: ExperimentSpec, rank: int, world: int) -> None:
        self.rule = build_rule(spec)
        self.rule.check(world)
        self.world, self.rank = world, rank
        self.liars = Liars(spec, world)
        self.byzantine = self.liars.ranks  # label_flip's too: their share of the aggregate is measured

    def _attacked(self, rows: Tensor, step: int, offset: int) -> Tensor:
        """``rows[world, b]`` (coordinates ``offset ...``) as float32, the liars' rows replaced."""
        return self.liars.replace(rows.float(), self.byzantine, step, offset)

    def _metrics(self, rule_s: float, comm_s: float, mass: Tensor | None) -> dict[str, float]:
        out = {"exchange/rule_ms": rule_s * 1000.0, "exchange/comm_ms": comm_s * 1000.0}
        if self.byzantine and mass is not None:
            from algorithms.aggregation.base import liar_share

            out["exchange/liar_weight"] = liar_share(mass, self.byzantine)
        return out


class GatherExchange(_RobustExchange):
    """``gather`` (ddp's default): bucketed all-gather, every rank applies the rule (see the module docstring)."""

    def __init__(self, spec: ExperimentSpec, rank: int, world: int, *, bucket_elems: int = DEFAULT_BUCKET,
                 keep_elems: int = DEFAULT_KEEP) -> None:
        super().__init__(spec, rank, world)
        self.bucket = max(1, int(bucket_elems))
        self.keep = int(keep_elems)

    def _gather(self, flat: Tensor, s: int, e: int) -> Tensor:
        buf = torch.empty(self.world * (e - s), dtype=flat.dtype, device=flat.device)
        if self.world > 1:
            _all_gather(buf, flat[s:e].contiguous())  # gloo wants a flat output
        else:
            buf.copy_(flat[s:e])
        return buf.view(self.world, e - s)

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        params = _params(model)
        flat = _flat_grad(params)
        d = flat.numel()
        spans = [(s, min(s + self.bucket, d)) for s in range(0, d, self.bucket)]
        with_mass = bool(self.byzantine)
        rule_s = comm_s = 0.0
        # pass 1's buckets are kept for pass 2 when all of them fit (world x d <= keep_elems); a single
        # bucket always is: pass 2 would allocate the same buffer to gather it again
        kept: dict[int, Tensor] | None = {} if self.world * d <= self.keep or len(spans) == 1 else None

        def rows(s: int, e: int) -> Tensor:
            nonlocal comm_s
            if kept is not None and s in kept:
                return kept.pop(s)
            t0 = time.perf_counter()
            buf = self._gather(flat, s, e)
            _sync(buf)
            comm_s += time.perf_counter() - t0
            return self._attacked(buf, step, s)

        stats: Tensor | None = None
        if self.rule.gram_kind is not None:
            for s, e in spans:
                block = rows(s, e)
                if kept is not None:
                    kept[s] = block
                t0 = time.perf_counter()
                part = self.rule.stats(block)
                assert part is not None
                stats = part if stats is None else stats + part
                rule_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = self.rule.plan(stats, self.world)
        rule_s += time.perf_counter() - t0
        agg = torch.empty(d, dtype=torch.float32, device=flat.device)
        mass: Tensor | None = None
        for s, e in spans:
            block = rows(s, e)
            t0 = time.perf_counter()
            value, m = self.rule.apply(plan, block, with_mass)
            agg[s:e] = value
            if m is not None:
                mass = m if mass is None else mass + m
            _sync(agg)
            rule_s += time.perf_counter() - t0
        _write_back(params, agg)
        return self._metrics(rule_s, comm_s, mass)


class ShardExchange(_RobustExchange):
    """``shard`` (deepspeed's default): robust reduce-scatter (all-to-all, rule on the owned shard, all-gather)."""

    def __init__(self, spec: ExperimentSpec, rank: int, world: int, *, exact_shards: bool = True) -> None:
        super().__init__(spec, rank, world)
        self.exact_shards = exact_shards

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        params = _params(model)
        flat = _flat_grad(params)
        d, w = flat.numel(), self.world
        shard = -(-d // w)
        padded = torch.zeros(w * shard, dtype=flat.dtype, device=flat.device)
        padded[:d] = flat
        t0 = time.perf_counter()
        recv = torch.empty_like(padded)
        if w > 1:
            dist.all_to_all_single(recv, padded)
        else:
            recv.copy_(padded)
        _sync(recv)
        comm_s = time.perf_counter() - t0
        start = self.rank * shard
        valid = max(0, min(shard, d - start))  # the last shards may hold padding only
        block = self._attacked(recv.view(w, shard)[:, :valid], step, start)
        with_mass = bool(self.byzantine)

        t0 = time.perf_counter()
        stats = self.rule.stats(block)
        if stats is not None:
            if self.exact_shards and w > 1:
                stats = stats.to(flat.device)
                _sync(stats)
                t1 = time.perf_counter()
                dist.all_reduce(stats)
                _sync(stats)
                comm_s += time.perf_counter() - t1
                t0 += time.perf_counter() - t1  # the all-reduce is communication, not rule time
        plan = self.rule.plan(stats, w)
        mine = torch.zeros(shard, dtype=torch.float32, device=flat.device)
        mass: Tensor | None = None
        if valid > 0:
            value, mass = self.rule.apply(plan, block, with_mass)
            mine[:valid] = value
        elif with_mass:
            mass = torch.zeros(w, dtype=torch.float64, device=flat.device)
        _sync(mine)
        rule_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        full = torch.empty(w * shard, dtype=torch.float32, device=flat.device)
        if w > 1:
            _all_gather(full, mine)
            if mass is not None:
                mass = mass.to(flat.device)
                dist.all_reduce(mass)
        else:
            full.copy_(mine)
        _sync(full)
        comm_s += time.perf_counter() - t1
        _write_back(params, full[:d])
        return self._metrics(rule_s, comm_s, mass)


def build_exchange(spec: ExperimentSpec, layout: ExchangeLayout | None, *, rank: int, world: int) -> Exchange | None:
    """The exchange of ``layout`` (``RunPlan.exchange``, which decides whether one runs), or ``None``."""
    if layout is None:
        return None
    return ShardExchange(spec, rank, world) if layout == "shard" else GatherExchange(spec, rank, world)
