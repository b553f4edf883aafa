"""Hyperparameters of every optimizer, one pydantic model each (no torch import here).

The spec's ``optimizer`` section is ``OptimizerConfig``: a union discriminated by ``name``, so an
unknown name is refused with the list of known ones. What an optimizer needs from the run is
declared on its config (class attributes), and the spec's rules ask the config:
``NEEDS_CLOSURE`` (its step re-runs forward and backward), ``PROJECTS_MATRICES`` (it keeps state
per whole weight matrix), and from these the strategies, ZeRO stages and precisions it runs under.
"""

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from algorithms._config import StrictModel

Betas = tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]]


class OptimizerBase(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "name"
    # step(closure) re-runs forward and backward on perturbed weights: the weights the forward
    # pass reads must be whole and local, and the gradients the plain (unscaled) ones.
    NEEDS_CLOSURE: ClassVar[bool] = False
    # Per-matrix projections of the gradient: state kept per whole 2-D parameter.
    PROJECTS_MATRICES: ClassVar[bool] = False

    name: str
    lr: float = Field(gt=0.0, le=10.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)

    @classmethod
    def strategies(cls) -> tuple[str, ...]:
        """The distributed strategies that can run this optimizer (the parameter server steps
        once per decoded gradient and has no forward pass to re-run)."""
        return ("ddp", "deepspeed") if cls.NEEDS_CLOSURE else ("ddp", "deepspeed", "parameter_server")

    @classmethod
    def zero_stages(cls) -> tuple[int, ...]:
        """The ZeRO stages it runs under with strategy deepspeed.

        Projections keep whole matrices: stages 1 and 2 run as whole-matrix optimizer-state
        partitioning (``algorithms.optimizers.partitioned.PartitionedOptimizer``: each rank owns
        whole parameters, keeps optimizer state only for those, and broadcasts the updated
        weights), which gives the same memory saving; stage 3 also shards the parameters, so no
        rank holds a whole matrix outside the forward and backward passes. A closure needs every
        weight whole and local: stage 0 only (unless it projects, and is partitioned as above).
        """
        if cls.PROJECTS_MATRICES:
            return (0, 1, 2)
        if cls.NEEDS_CLOSURE:
            return (0,)
        return (0, 1, 2, 3)

    @classmethod
    def tolerates_loss_scaling(cls) -> bool:
        """fp16 needs a loss scaler, which unscales once per step: a closure's extra backward
        passes would hand the optimizer scaled gradients."""
        return not cls.NEEDS_CLOSURE

    def whole_params_reason(self) -> str | None:
        """Why this optimizer needs whole parameters and gradients on every rank, or None."""
        if self.PROJECTS_MATRICES:
            return f"optimizer {self.name!r} projects each gradient matrix as a whole"
        if self.NEEDS_CLOSURE:
            return f"optimizer {self.name!r} re-runs forward and backward on perturbed weights inside its step"
        return None

    def check_distributed(self, strategy: str, zero_stage: int | None, precision: str) -> None:
        """Raise ValueError when this optimizer cannot run under the strategy / ZeRO stage / precision."""
        if strategy not in self.strategies():
            raise ValueError(f"needs extra forward passes inside its step, which strategy {strategy} does not "
                             f"run: use strategy {' or '.join(self.strategies())}")
        if strategy == "deepspeed" and zero_stage is not None and zero_stage not in self.zero_stages():
            raise ValueError(
                f"{self.whole_params_reason()}, which ZeRO stage {zero_stage} splits across ranks: use deepspeed "
                f"zero_stage {', '.join(map(str, self.zero_stages()))} or strategy ddp"
            )
        if precision == "fp16" and not self.tolerates_loss_scaling():
            raise ValueError("fp16 loss scaling does not compose with an optimizer that re-runs backward "
                             "inside its step (the scaler unscales once): use train.precision bf16 or fp32")


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

    PROJECTS_MATRICES: ClassVar[bool] = True


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
    NEEDS_CLOSURE: ClassVar[bool] = True
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
    NEEDS_CLOSURE: ClassVar[bool] = True

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
