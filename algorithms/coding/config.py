"""Gradient codes against stragglers: hyperparameters only (no torch import here).

One-shot codes (Tandon et al., ICML 2017): ``stragglers`` is ``s``, the number of workers the
server may ignore in every step. Sequential codes (Krishnan, Ebrahimi and Khisti, ICLR 2023):
``stragglers`` is ``lambda`` of the (B, W, lambda)-bursty model -- at most ``lambda`` distinct
stragglers in any ``window`` (W) consecutive rounds, each straggling within a burst of at most
``burst`` (B) consecutive rounds -- and the delay ``T`` (rounds a job may take) follows from them.
"""

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from algorithms._config import StrictModel


class CodeBase(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "scheme"
    # Round-based (a job's parts arrive over several rounds) rather than one-shot.
    SEQUENTIAL: ClassVar[bool] = False
    # Every worker's message is an unbiased estimate of the full gradient (unit weights, whole
    # parts), so a robust rule can compare messages; other codes mix parts with signed weights.
    MESSAGES_ESTIMATE_THE_GRADIENT: ClassVar[bool] = False

    scheme: str
    stragglers: int = Field(default=1, ge=0, description="s (one-shot) or lambda (sequential)")

    def validate_for(self, n: int) -> None:
        """Refuse a code that cannot exist for ``n`` workers (raises ValueError)."""
        if n < 1:
            raise ValueError(f"gradient_coding needs at least one worker, got num_workers={n}")
        if self.stragglers >= n:
            raise ValueError(
                f"gradient_coding.stragglers={self.stragglers} must be below num_workers={n}"
            )

    def min_batch_size(self, n: int) -> int:
        """Smallest global batch that gives every data part at least one sample."""
        return n


class FractionalRepetitionConfig(CodeBase):
    MESSAGES_ESTIMATE_THE_GRADIENT: ClassVar[bool] = True

    scheme: Literal["fractional_repetition"]

    def validate_for(self, n: int) -> None:
        super().validate_for(n)
        if n % (self.stragglers + 1):
            raise ValueError(
                f"fractional_repetition needs num_workers ({n}) divisible by stragglers + 1 "
                f"({self.stragglers + 1}); use cyclic_repetition for any n"
            )


class CyclicRepetitionConfig(CodeBase):
    scheme: Literal["cyclic_repetition"]
    seed: int = Field(default=0, ge=0, description="no effect: the cyclic code is deterministic now; "
                      "kept so that specs written when it seeded random candidates still validate")


class _SequentialBase(CodeBase):
    SEQUENTIAL: ClassVar[bool] = True

    burst: int = Field(default=1, ge=1, le=64, description="B: longest straggler burst (rounds)")
    window: int = Field(default=2, ge=2, le=64, description="W: window of the bursty model")
    seed: int = Field(default=0, ge=0, description="no effect (the codes are deterministic); kept so that "
                      "older specs still validate")
    patience: float = Field(
        default=0.5, ge=0.0, le=100.0,
        description="mu: the server waits (1 + mu) x the first worker's time, then declares the "
                    "workers still missing stragglers if that keeps the pattern inside the model",
    )

    @model_validator(mode="after")
    def _burst_below_window(self) -> "_SequentialBase":
        if self.burst >= self.window:
            raise ValueError(f"{self.scheme} needs burst (B={self.burst}) < window (W={self.window})")
        return self


class SequentialGCConfig(_SequentialBase):
    """Krishnan et al. SR-SGC: GC combined with selective repetition; delay T = B."""

    scheme: Literal["sequential_gc"]

    @property
    def delay(self) -> int:
        return self.burst

    def validate_for(self, n: int) -> None:
        super().validate_for(n)
        if (self.window - 1) % self.burst:
            raise ValueError(
                f"sequential_gc needs window - 1 ({self.window - 1}) divisible by burst "
                f"({self.burst}); use multiplexed_sgc for any B < W"
            )


class MultiplexedSGCConfig(_SequentialBase):
    """Krishnan et al. M-SGC: multiplexed GC + repetition adapting to past stragglers;
    delay T = W - 2 + B."""

    scheme: Literal["multiplexed_sgc"]

    @property
    def delay(self) -> int:
        return self.window - 2 + self.burst

    def min_batch_size(self, n: int) -> int:
        # the smallest part (a D2 piece) is 1 / (n (B + (W - 1)(lambda + 1))) of a job's data
        return n * (self.burst + (self.window - 1) * (self.stragglers + 1))


CodingConfig = Annotated[
    FractionalRepetitionConfig | CyclicRepetitionConfig | SequentialGCConfig | MultiplexedSGCConfig,
    Field(discriminator="scheme"),
]
