"""The ``train`` section: how long, how big, how often to log, evaluate and checkpoint."""

from typing import Literal

from pydantic import Field, model_validator

from algorithms._config import StrictModel


class TrainSpec(StrictModel):
    max_steps: int = Field(ge=1, le=10_000_000)
    batch_size: int = Field(ge=1, le=1_048_576, description="global batch per optimizer step")
    grad_accum: int = Field(default=1, ge=1, le=4096, description="micro-steps per optimizer step")
    eval_every: int | None = Field(default=None, ge=1, description="steps; default: at the end only")
    eval_batches: int = Field(default=8, ge=1, le=100_000)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int | None = Field(default=None, ge=1, description="steps; default: at the end only")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = Field(default=None, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    compile: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.warmup_steps >= self.max_steps and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
            )
        return self
