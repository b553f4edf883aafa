"""The ``faults`` section: simulated Byzantine workers, stragglers and killed workers (seeded)."""

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from algorithms._config import StrictModel
from algorithms.aggregation.config import AttackConfig


class _Chosen(StrictModel):
    count: int | None = Field(default=None, ge=0)
    ranks: list[Annotated[int, Field(ge=0)]] | None = None
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _count_or_ranks(self) -> "_Chosen":
        if (self.count is None) == (self.ranks is None):
            raise ValueError("give exactly one of count or ranks")
        if self.ranks is not None and len(set(self.ranks)) != len(self.ranks):
            raise ValueError("ranks must be distinct")
        return self

    @property
    def n(self) -> int:
        return self.count if self.count is not None else len(self.ranks or [])


class ByzantineSpec(_Chosen):
    attack: AttackConfig

    @property
    def attacks_gradients(self) -> bool:
        """Some worker lies in the gradient exchange (a data attack leaves the exchange honest)."""
        return self.n > 0 and self.attack.ACTS_ON == "gradients"

    @field_validator("attack", mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class DelaySpec(StrictModel):
    dist: Literal["fixed", "exponential", "pareto"]
    mean_ms: float = Field(default=100.0, gt=0.0, le=3_600_000.0)
    alpha: float = Field(default=2.0, gt=1.0, le=100.0, description="Pareto shape (mean finite needs > 1)")


class BurstSpec(StrictModel):
    """Stragglers that come and go in bursts, (B, W, lambda)-bursty (Krishnan et al. 2023): in any
    W consecutive rounds at most ``count`` (lambda) distinct workers straggle, each for bursts of at
    most B rounds; a seeded pattern picks who straggles each round."""

    burst: int = Field(default=2, ge=1, le=64, description="B: the longest burst of one straggler, in rounds")
    window: int = Field(default=3, ge=2, le=64, description="W: the window the bound applies to, in rounds")
    p_start: float = Field(default=0.3, gt=0.0, le=1.0, description="a clean worker starts straggling")
    p_continue: float = Field(default=0.8, ge=0.0, le=1.0, description="a straggler keeps straggling")

    @model_validator(mode="after")
    def _burst_below_window(self) -> "BurstSpec":
        if self.burst >= self.window:
            raise ValueError(f"burst (B={self.burst}) must be below window (W={self.window})")
        return self


class StragglerSpec(_Chosen):
    delay: DelaySpec
    bursts: BurstSpec | None = Field(
        default=None, description="stragglers that change from round to round (count is lambda); "
        "None: the same workers straggle every round")

    @model_validator(mode="after")
    def _bursts_need_count(self) -> "StragglerSpec":
        if self.bursts is not None and self.ranks is not None:
            raise ValueError("bursts: give count (lambda), not ranks: the pattern picks who straggles")
        return self


class KillSpec(StrictModel):
    rank: int = Field(default=0, ge=0)
    step: int = Field(ge=1)


FailureKind = Literal["oom", "node_lost", "nccl", "preempted", "user_error"]
FAILURE_KINDS: tuple[str, ...] = ("oom", "node_lost", "nccl", "preempted", "user_error")


class FailJobSpec(StrictModel):
    """The job fails with this kind of failure, after its first checkpoint, on its first
    ``attempts`` attempts: what a retry policy is tested with."""

    kind: FailureKind
    attempts: int = Field(default=1, ge=1, le=100)


class FaultsSpec(StrictModel):
    byzantine: ByzantineSpec | None = None
    stragglers: StragglerSpec | None = None
    kill: KillSpec | None = None
    fail_job: FailJobSpec | None = None
