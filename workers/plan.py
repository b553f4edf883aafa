"""What the workers derive from a spec, derived in one place.

``RunPlan.from_spec(spec)`` is the only place on the worker side where defaults that depend on
other fields are filled in (the evaluation and checkpoint periods, default resources), where the
ZeRO stage DeepSpeed's engine runs at is read, and where it is decided whether the robust gradient
exchange runs (DeepSpeed's own all-reduce is turned off exactly when it does). Every consumer (the
training loop, the strategies, the launcher, the sweep, the parameter server) reads the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.spec import ExperimentSpec
from service.spec.deepspeed_rules import engine_stage, gradient_exchange
from workers.cadence import Cadence
from workers.faults import chosen_ranks

ExchangeLayout = Literal["gather", "shard"]


@dataclass(frozen=True)
class RunPlan:
    strategy: str
    cadence: Cadence
    exchange: ExchangeLayout | None  # None: the plain mean all-reduce (DDP's or DeepSpeed's) does
    zero_stage: int | None  # the stage DeepSpeed's engine runs at (0 in whole-parameter mode); None off DeepSpeed
    resources_per_worker: dict[str, float]  # Ray resources of one worker (or parameter-server actor)
    label_flip_ranks: frozenset[int]  # workers that train on flipped labels (faults.byzantine)

    @classmethod
    def from_spec(cls, spec: ExperimentSpec) -> RunPlan:
        train, dist, byz = spec.train, spec.distributed, spec.faults.byzantine
        assert train is not None, "a training spec (merges have no plan)"
        exchange: ExchangeLayout | None = None
        if dist.strategy != "parameter_server" and gradient_exchange(spec):
            auto: ExchangeLayout = "shard" if dist.strategy == "deepspeed" else "gather"
            exchange = auto if dist.exchange == "auto" else dist.exchange
        flip = byz is not None and byz.attack.name == "label_flip"
        return cls(
            strategy=dist.strategy,
            cadence=Cadence(max_steps=train.max_steps, log_every=train.log_every,
                            eval_every=train.eval_every or train.max_steps,
                            checkpoint_every=train.checkpoint_every or train.max_steps),
            exchange=exchange,
            zero_stage=engine_stage(spec) if dist.strategy == "deepspeed" else None,
            resources_per_worker=dict(dist.resources_per_worker or {})
            or {"CPU": 1.0, **({"GPU": 1.0} if dist.use_gpu else {})},
            label_flip_ranks=frozenset(chosen_ranks(byz, dist.num_workers) if flip else []),
        )
