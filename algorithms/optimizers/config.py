"""Hyperparameters of every optimizer, one pydantic model each (no torch import here).

The spec's ``optimizer`` section is ``OptimizerConfig``: a union discriminated by ``name``, so an
unknown name is refused with the list of known ones.
"""

from typing import Annotated, Literal

from pydantic import Field

from algorithms._config import StrictModel

Betas = tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]]


class OptimizerBase(StrictModel):
    name: str
    lr: float = Field(gt=0.0, le=10.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)

    def check_distributed(self, strategy: str, zero_stage: int | None) -> None:
        """Raise ValueError when this optimizer cannot run under the strategy / ZeRO stage."""


class AdamWConfig(OptimizerBase):
    name: Literal["adamw"]
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)


class SGDConfig(OptimizerBase):
    name: Literal["sgd"]
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    nesterov: bool = False


class LowRankMixin(StrictModel):
    rank: int = Field(default=128, ge=1)
    update_proj_gap: int = Field(default=200, ge=1)
    moments_on_change: Literal["project", "keep"] = Field(
        default="project",
        description="when the subspace is refreshed: 'project' carries the Adam moments into the new "
        "basis (first moment by the basis-change matrix T, second by T squared elementwise); 'keep' "
        "leaves them as they are (what galore-torch and DCTAdamW(rotate_subspace=False) do)",
    )

    def check_distributed(self, strategy: str, zero_stage: int | None) -> None:
        """Projections act on whole matrices, so ZeRO's flat partitions cannot hold them.

        ZeRO stages 1 and 2 (optimizer-state, and gradient, partitioning) are run as whole-matrix
        partitioning instead (``algorithms.optimizers.partitioned.PartitionedOptimizer``: each rank
        owns whole parameters, keeps optimizer state only for those, and broadcasts the updated
        weights), which gives the same memory saving for the optimizer state. ZeRO stage 3 also
        shards the parameters themselves, so no rank holds a whole matrix outside the forward and
        backward passes: rejected.
        """
        if strategy == "deepspeed" and zero_stage == 3:
            raise ValueError(
                "per-matrix projections need whole parameters, which ZeRO stage 3 shards: use "
                "deepspeed zero_stage 0, 1 or 2 (stages 1 and 2 run as whole-matrix optimizer-state "
                "partitioning: each rank owns whole matrices) or strategy ddp"
            )


class GaLoreConfig(LowRankMixin, OptimizerBase):
    name: Literal["galore"]
    scale: float = Field(default=0.25, gt=0.0)
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-6, gt=0.0)


class DCTConfig(LowRankMixin, OptimizerBase):
    name: Literal["dct"]
    update_proj_gap: int = Field(
        default=1,
        ge=1,
        description="steps between subspace selections; 1 (the default, as in the authors' DCTAdamW) "
        "re-selects every step. A selection costs, per matrix, the full coefficient matmul G C "
        "(n x n instead of n x rank) plus a top-k and the moment matching, so a larger gap makes "
        "steps cheaper (bench/RESULTS.md times DCT with 100 and 200) at the price of an older subspace",
    )
    scale: float = Field(default=1.0, gt=0.0)
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)


class ZerothOrderMixin(StrictModel):
    rho: float = Field(default=0.05, gt=0.0)
    mu: float = Field(default=1e-3, gt=0.0)
    n_directions: int = Field(default=1, ge=1, le=1024)


class AdaZoSAMConfig(ZerothOrderMixin, OptimizerBase):
    name: Literal["adazo_sam"]
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)


class LorenzaConfig(ZerothOrderMixin, LowRankMixin, OptimizerBase):
    name: Literal["lorenza"]
    scale: float = Field(default=0.25, gt=0.0)
    oversampling: int = Field(default=8, ge=0)
    power_iters: int = Field(default=1, ge=0, le=10)
    plus: bool = False
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)


class LambConfig(OptimizerBase):
    name: Literal["lamb"]
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-6, gt=0.0)


class DiffGradConfig(OptimizerBase):
    name: Literal["diffgrad"]
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)


class SAMConfig(OptimizerBase):
    name: Literal["sam"]
    rho: float = Field(default=0.05, gt=0.0)
    base: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)


OptimizerConfig = Annotated[
    AdamWConfig
    | SGDConfig
    | GaLoreConfig
    | DCTConfig
    | AdaZoSAMConfig
    | LorenzaConfig
    | LambConfig
    | DiffGradConfig
    | SAMConfig,
    Field(discriminator="name"),
]
