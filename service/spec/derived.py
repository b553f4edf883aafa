"""Values the spec leaves to a default that depends on other fields, decided once here.

``ExperimentSpec.resolved()`` writes them into the stored spec (no optional field left to
interpret), and workers read them through ``ExperimentSpec.derived()``, which gives the same
values for a resolved spec and for the spec it was resolved from.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from service.spec.distributed import DistributedSpec
    from service.spec.model import ExperimentSpec

ExchangeLayout = Literal["none", "gather", "shard"]


@dataclass(frozen=True)
class Derived:
    """A training spec's derived values."""

    eval_every: int  # steps between evaluations (the last step always evaluates)
    checkpoint_every: int  # steps between checkpoints (the last step always saves)
    resources_per_worker: dict[str, float]  # what each worker claims from Ray
    exchange: ExchangeLayout  # the robust gradient exchange between backward and the step
    zero_stage: int | None  # the ZeRO stage asked for; None unless strategy is deepspeed


POOL_SHARE = 0.001  # what each worker claims of its pool's resource: a marker, not a limit


def worker_resources(dist: "DistributedSpec") -> dict[str, float]:
    """The spec's resources per worker, or one CPU (and one GPU with ``use_gpu``); a share of the
    pool's resource where the spec names one (Ray places the worker on a node that carries it)."""
    base = dict(dist.resources_per_worker) if dist.resources_per_worker else \
        {"CPU": 1.0, **({"GPU": 1.0} if dist.use_gpu else {})}
    if dist.pool is not None:
        base[dist.pool] = POOL_SHARE
    return base


def processes(dist: "DistributedSpec") -> int:
    """The worker processes a training run starts: one per worker, or one for workers simulated in
    the job's process."""
    return 1 if dist.placement == "in_process" else dist.num_workers


def demand(spec: "ExperimentSpec") -> dict[str, Any]:
    """What the run's job claims from the cluster while it runs: ``count`` bundles of ``bundle``
    (each a worker: one node must hold it whole). A sweep counts ``max_concurrent_trials`` trials;
    without it, one (what it needs to start: Tune queues the other trials and runs as many as the
    cluster then holds, so quotas count only its first; give max_concurrent_trials to have them
    count each); a command claims its own resources once; a merge runs in the job's driver, which
    claims nothing."""
    if spec.task.kind == "command":
        return {"bundle": dict(spec.distributed.resources_per_worker or {}), "count": 1}
    sweep = spec.sweep
    if spec.task.kind == "merge":
        at_once = 0 if sweep is None else (sweep.max_concurrent_trials or 1)  # a trial: one CPU
        return {"bundle": {"CPU": 1.0} if at_once else {}, "count": at_once}
    count = processes(spec.distributed)
    if sweep is not None:
        count *= sweep.max_concurrent_trials or 1
    return {"bundle": worker_resources(spec.distributed), "count": count}


def gpus_held(spec: "ExperimentSpec") -> float:
    """The GPUs the run holds while it is active, what the GPU quotas count."""
    need = demand(spec)
    return float(need["bundle"].get("GPU", 0.0)) * int(need["count"])


def needs_robust_exchange(spec: "ExperimentSpec") -> bool:
    """A robust rule, or simulated Byzantine gradients: every rank's whole gradient is needed."""
    agg = spec.distributed.aggregator
    byz = spec.faults.byzantine
    return (agg is not None and agg.ROBUST) or (byz is not None and byz.attacks_gradients)


def exchange_layout(spec: "ExperimentSpec") -> ExchangeLayout:
    """``none`` when the plain all-reduce does (or the parameter server gathers gradients itself);
    otherwise the layout asked for, ``auto`` being ``gather`` under ddp and ``shard`` under deepspeed."""
    dist = spec.distributed
    if dist.strategy == "parameter_server" or not needs_robust_exchange(spec):
        return "none"
    if dist.exchange in ("gather", "shard"):
        return dist.exchange
    return "shard" if dist.strategy == "deepspeed" else "gather"


def zero_stage(spec: "ExperimentSpec") -> int | None:
    """The ZeRO stage asked for (2 when the deepspeed section is left out); None off deepspeed."""
    if spec.distributed.strategy != "deepspeed":
        return None
    ds = spec.distributed.deepspeed
    return ds.zero_stage if ds is not None else 2


def derive(spec: "ExperimentSpec") -> Derived:
    train = spec.train
    if train is None:
        raise ValueError(f"train: task.kind {spec.task.kind!r} trains nothing, so it has no training values")
    return Derived(
        eval_every=train.eval_every or train.max_steps,
        checkpoint_every=train.checkpoint_every or train.max_steps,
        resources_per_worker=worker_resources(spec.distributed),
        exchange=exchange_layout(spec),
        zero_stage=zero_stage(spec),
    )
