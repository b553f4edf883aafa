"""Aggregation rules and Byzantine attacks: hyperparameters only (no torch import here).

Every robust rule takes ``f``, the number of Byzantine workers it tolerates; ``validate_for(n)``
refuses an ``f`` the rule cannot tolerate with ``n`` workers. ``ROBUST`` says whether a rule
needs every worker's whole gradient (the plain mean does not: an all-reduce computes it), and an
attack's ``ACTS_ON`` whether the liars rewrite their gradients or train on poisoned data.
"""

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from algorithms._config import StrictModel


class RuleBase(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "name"
    ROBUST: ClassVar[bool] = True

    name: str
    f: int = Field(default=0, ge=0)

    def max_f(self, n: int) -> int:
        """The largest f this rule tolerates with n workers."""
        return (n - 1) // 2

    def validate_for(self, n: int) -> None:
        if self.f > self.max_f(n):
            raise ValueError(
                f"aggregator {self.name!r} tolerates at most f={max(self.max_f(n), 0)} "
                f"Byzantine workers out of num_workers={n} (got f={self.f})"
            )


class MeanConfig(RuleBase):
    ROBUST: ClassVar[bool] = False

    name: Literal["mean"]

    def max_f(self, n: int) -> int:
        return 0


class MedianConfig(RuleBase):
    name: Literal["median"]


class TrimmedMeanConfig(RuleBase):
    name: Literal["trimmed_mean"]


class KrumConfig(RuleBase):
    name: Literal["krum"]

    def max_f(self, n: int) -> int:  # n >= 2f + 3
        return (n - 3) // 2


class MultiKrumConfig(RuleBase):
    name: Literal["multi_krum"]
    m: int | None = Field(default=None, ge=1, description="selected gradients; default n - f")

    def max_f(self, n: int) -> int:
        return (n - 3) // 2

    def validate_for(self, n: int) -> None:
        super().validate_for(n)
        if self.m is not None and self.m > n:
            raise ValueError(f"multi_krum m={self.m} exceeds num_workers={n}")


class BulyanConfig(RuleBase):
    name: Literal["bulyan"]

    def max_f(self, n: int) -> int:  # n >= 4f + 3
        return (n - 3) // 4


class GeometricMedianConfig(RuleBase):
    name: Literal["geometric_median"]
    max_iter: int = Field(default=100, ge=1, le=10_000)
    eps: float = Field(default=1e-8, gt=0.0)
    tol: float = Field(default=1e-6, gt=0.0)


class FlagConfig(RuleBase):
    """Flag Aggregator (Almasi et al., ICLR 2024): IRLS flag median of the normalised gradients.

    ``max_iter`` is the IRLS budget (the authors' ``flag`` GAR hard-codes 1 iteration, their
    ``flag_median`` 4; ours also stops when the objective stops decreasing); ``eps`` perturbs the
    IRLS weights (sin^2 + eps)^(-1/4) (1e-7 in the authors' code); ``lam`` weights the pairwise
    difference terms of the regularised objective (0 in the authors' default runs).
    """

    name: Literal["flag"]
    r: int | None = Field(default=None, ge=1,
                          description="subspace dimension; default ceil(n / 2), as in the authors' runs")
    max_iter: int = Field(default=5, ge=1, le=1000)
    eps: float = Field(default=1e-7, gt=0.0)
    lam: float = Field(default=0.0, ge=0.0, description="coefficient of the pairwise terms")

    def validate_for(self, n: int) -> None:
        super().validate_for(n)
        if self.r is not None and self.r > n:
            raise ValueError(f"flag r={self.r} exceeds num_workers={n}")


AggregatorConfig = Annotated[
    MeanConfig
    | MedianConfig
    | TrimmedMeanConfig
    | KrumConfig
    | MultiKrumConfig
    | BulyanConfig
    | GeometricMedianConfig
    | FlagConfig,
    Field(discriminator="name"),
]


class AttackBase(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "name"
    # "gradients": the liars' rows of the exchange are computed from the honest rows;
    # "data": the liars compute honest gradients of poisoned data (the task poisons it).
    ACTS_ON: ClassVar[Literal["gradients", "data"]] = "gradients"

    name: str


class SignFlipAttack(AttackBase):
    name: Literal["sign_flip"]
    scale: float = Field(default=1.0, gt=0.0)


class GaussianAttack(AttackBase):
    name: Literal["gaussian"]
    std: float = Field(default=1.0, gt=0.0)


class UniformAttack(AttackBase):
    """Every liar sends U[low, high) noise (the Flag authors' "random" attack is U[0, 1))."""

    name: Literal["uniform"]
    low: float = 0.0
    high: float = 1.0

    @model_validator(mode="after")
    def _check_range(self) -> "UniformAttack":
        if not self.high > self.low:
            raise ValueError(f"uniform attack needs high > low (got low={self.low}, high={self.high})")
        return self


class ALIEAttack(AttackBase):
    """A little is enough (Baruch et al. 2019): every liar sends mean - z * std of the honest rows."""

    name: Literal["alie"]
    z: float | None = Field(default=None, description="deviations; default from the paper's formula")


class IPMAttack(AttackBase):
    name: Literal["ipm"]
    epsilon: float = Field(default=0.1, gt=0.0)


class LabelFlipAttack(AttackBase):
    ACTS_ON: ClassVar[Literal["gradients", "data"]] = "data"

    name: Literal["label_flip"]


AttackConfig = Annotated[
    SignFlipAttack | GaussianAttack | UniformAttack | ALIEAttack | IPMAttack | LabelFlipAttack,
    Field(discriminator="name"),
]
