"""The ``distributed`` section: workers, strategy, DeepSpeed, gradient exchange."""

from typing import Any, Literal

from pydantic import Field, field_validator

from algorithms._config import StrictModel
from algorithms.aggregation.config import AggregatorConfig
from algorithms.coding.config import CodingConfig


class DeepSpeedSpec(StrictModel):
    zero_stage: int = Field(default=2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    config: dict[str, Any] = Field(
        default_factory=dict, description="raw DeepSpeed config fragment merged over the generated one"
    )


class DistributedSpec(StrictModel):
    num_workers: int = Field(default=1, ge=1, le=1024)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description="Ray resources each worker claims; default one CPU (and one GPU with use_gpu)")
    pool: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$",
                             description="a Ray resource the pool's nodes carry (ray start --resources "
                             "'{\"<pool>\": 1000}'): the workers go only there")
    strategy: Literal["ddp", "deepspeed", "parameter_server"] = "ddp"
    placement: Literal["actors", "in_process"] = Field(
        default="actors",
        description="strategy parameter_server: 'actors' runs one Ray actor per worker; 'in_process' "
        "simulates the workers in the job's own process on a simulated clock (each message arrives after "
        "its worker's measured compute time plus its injected delay, as if the workers ran in parallel): "
        "one CPU whatever num_workers, for simulation studies of robust rules and gradient codes")
    deepspeed: DeepSpeedSpec | None = None
    aggregator: AggregatorConfig | None = None
    exchange: Literal["auto", "none", "gather", "shard"] = Field(
        default="auto",
        description="how ddp/deepspeed ranks combine gradients under a robust rule or an attack: 'gather' "
        "all-gathers every rank's gradient, 'shard' all-to-alls shards and aggregates one per rank (the "
        "same aggregate, a ring all-reduce's traffic); 'auto' is gather under ddp, shard under deepspeed. "
        "The resolved spec says 'none' where no robust exchange runs (a plain mean, or the parameter server)",
    )
    gradient_coding: CodingConfig | None = None
    max_failures: int = Field(default=0, ge=0, le=100, description="worker restarts from the last checkpoint")

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"resources_per_worker.{key} must be >= 0 (got {amount})")
        return value
