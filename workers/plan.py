"""What the workers derive from a spec, derived in one place.

``RunPlan.from_spec(spec)`` is the only place on the worker side that reads the values the
control plane derived into the resolved spec (the evaluation and checkpoint periods, resources,
whether the robust gradient exchange runs and in which layout: DeepSpeed's own all-reduce is
turned off exactly when it does) and the ZeRO stage DeepSpeed's engine runs at. Every consumer
(the training loop, the strategies, the launcher, the sweep, the parameter server) reads the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.spec import ExperimentSpec
from service.spec.deepspeed_rules import engine_stage
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
        """The plan of a resolved spec: the values the control plane derived and stored with the
        run (``ExperimentSpec.derived``), and the worker-side facts that follow from them."""
        train, dist, byz = spec.train, spec.distributed, spec.faults.byzantine
        assert train is not None, "a training spec (merges have no plan)"
        derived = spec.derived()
        flip = byz is not None and not byz.attacks_gradients
        return cls(
            strategy=dist.strategy,
            cadence=Cadence(max_steps=train.max_steps, log_every=train.log_every,
                            eval_every=derived.eval_every, checkpoint_every=derived.checkpoint_every),
            exchange=None if derived.exchange == "none" else derived.exchange,
            zero_stage=engine_stage(spec) if dist.strategy == "deepspeed" else None,
            resources_per_worker=dict(derived.resources_per_worker),
            label_flip_ranks=frozenset(chosen_ranks(byz, dist.num_workers) if flip else []),
        )
