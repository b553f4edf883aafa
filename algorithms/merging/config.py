"""Model merging methods: hyperparameters only (no torch import here).

Each model is the ``merge`` section of a spec with ``task.kind: merge``. The fields ``method``,
``inputs``, ``base`` and ``data`` say what is merged and on what (the worker resolves them to
modules and batches); the others are the method's hyperparameters, which its merger reads from
the typed config (``algorithms.merging.registry.MERGERS.build(cfg)``).

What a method needs at merge time besides the inputs is declared here, and the merge job supplies
it without knowing the method: ``NEEDS_BASE`` (the model the inputs were fine-tuned from, or their
shared base under PEFT adapters), ``needs_data()`` (batches of ``task.dataset``), ``needs_loss()``
(the task's own loss on a batch) and ``needs_example_shape()`` (one example's shape, when no data
is drawn).
"""

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from algorithms._config import StrictModel

# ``merge.base`` value: the inputs are PEFT adapter runs; the base is the frozen model under them.
ADAPTER_BASE = "adapters"


class MergeData(StrictModel):
    """The batches a merger sees (PLeaS's activations, aTLAS's coefficient fit): drawn from the
    training split of the spec's ``task.dataset``."""

    batches: int = Field(default=8, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0)


class MergeBase(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "method"
    NEEDS_BASE: ClassVar[bool] = False  # merges task vectors: merge.base, or adapter inputs' shared base

    method: str
    inputs: list[str] = Field(
        min_length=2, description="run ids, MLflow model URIs (runs:/, models:/) or local paths"
    )
    base: str | None = Field(
        default=None,
        description="the model the inputs were fine-tuned from (a reference like the inputs), or "
        f"{ADAPTER_BASE!r} when the inputs are PEFT adapter runs: the shared base under their adapters",
    )
    data: MergeData | None = Field(
        default=None,
        description="data given to the merger; None: the defaults when the method needs data, else none",
    )

    def needs_data(self) -> bool:
        """Whether the merger needs batches of ``task.dataset`` (drawn with ``data`` or its defaults)."""
        return False

    def needs_loss(self) -> bool:
        """Whether the merger trains on the task's own loss, ``loss_fn(model, batch)``."""
        return False

    def needs_example_shape(self) -> bool:
        """Whether, when no data is drawn, the merger needs one example's shape (from the task)."""
        return False


class AverageConfig(MergeBase):
    """Uniform or weighted mean of the inputs' parameters (weights are normalised to sum 1)."""

    method: Literal["average"]
    weights: list[Annotated[float, Field(ge=0.0)]] | None = None

    @model_validator(mode="after")
    def _weights_fit_inputs(self) -> "AverageConfig":
        if self.weights is not None:
            if len(self.weights) != len(self.inputs):
                raise ValueError(
                    f"weights: {len(self.weights)} given for {len(self.inputs)} inputs (one per input)"
                )
            if sum(self.weights) <= 0.0:
                raise ValueError("weights: must not all be zero")
        return self


class TaskArithmeticConfig(MergeBase):
    """Ilharco et al. 2023: theta = base + scaling * sum_t (theta_t - base)."""

    NEEDS_BASE: ClassVar[bool] = True

    method: Literal["task_arithmetic"]
    scaling: float = Field(default=1.0, gt=0.0, le=10.0)


class TiesConfig(MergeBase):
    """Yadav et al. 2023 (TIES-Merging): trim, elect sign, disjoint mean, then scale."""

    NEEDS_BASE: ClassVar[bool] = True

    method: Literal["ties"]
    density: float = Field(default=0.2, gt=0.0, le=1.0, description="fraction of entries kept")
    scaling: float = Field(default=1.0, gt=0.0, le=10.0)
    trim_scope: Literal["global", "tensor"] = Field(
        default="global",
        description="top-density by magnitude over the whole task vector (paper) or per tensor (peft)",
    )


class PleasConfig(MergeBase):
    """Nasery et al. 2024 (PLeaS): partial permutation matching, then layer-wise least squares."""

    method: Literal["pleas"]
    target_width: float | None = Field(
        default=None,
        gt=0.0,
        le=2.0,
        description="merged width of every hidden layer as a fraction of the inputs' width "
        "(1.0 = same size, 2.0 = both models side by side; None = 1.0)",
    )
    data_free: bool = Field(
        default=False,
        description="PLeaS-free: match and fit on proxy data (give merge.data: drawn from task.dataset, "
        "which may then be another domain) or, without merge.data, on standard-normal inputs of input_shape",
    )
    ridge: float = Field(
        default=1e-4, ge=0.0, le=1.0, description="ridge term, relative to the mean diagonal of X^T X"
    )
    propagate: bool = Field(
        default=False,
        description="fit each layer on the merged model's own inputs instead of the permuted "
        "inputs of the originals (the paper's choice)",
    )
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="one example's shape, for data_free without data (e.g. [64])"
    )
    noise_samples: int = Field(default=512, ge=16, le=1_000_000)

    def needs_data(self) -> bool:
        return not self.data_free

    def needs_example_shape(self) -> bool:
        return self.data_free and self.input_shape is None  # PLeaS-free on noise of that shape

    @model_validator(mode="after")
    def _two_inputs(self) -> "PleasConfig":
        if len(self.inputs) != 2:
            raise ValueError(f"inputs: pleas merges exactly 2 models, got {len(self.inputs)}")
        return self


class AtlasConfig(MergeBase):
    """Zhang et al. 2024 (aTLAS): learned coefficients on the task vectors, one per task vector and
    parameter block (``blockwise``, the paper's anisotropic scaling) or one per task vector.

    Defaults follow the authors' code (fredzzhang/atlas: zero start, AdamW, weight decay 0.1)
    except the learning rate: theirs is 1e-3 with a cosine schedule over thousands of steps; with
    the 100 constant-rate steps here 1e-3 would keep every coefficient within about 0.1 of its
    start, so the default is 1e-2 (set ``lr: 0.001`` and more ``steps`` to match them)."""

    NEEDS_BASE: ClassVar[bool] = True

    method: Literal["atlas"]
    steps: int = Field(default=100, ge=0, le=100_000)
    lr: float = Field(
        default=1e-2,
        gt=0.0,
        description="AdamW learning rate of the coefficients (constant). The authors use 1e-3 with a "
        "cosine schedule over thousands of steps; 1e-2 here so that the default 100 steps can move a "
        "coefficient by about 1 (Adam moves it by about lr per step)",
    )
    weight_decay: float = Field(
        default=0.1, ge=0.0, le=10.0, description="AdamW (decoupled) weight decay on the coefficients, as the authors"
    )
    unlabelled: bool = Field(default=False, description="entropy minimisation instead of cross-entropy")
    init: Literal["zero", "mean"] | float = Field(
        default="zero",
        description="initial coefficients: 'zero' (the authors': the merge starts at the base), 'mean' "
        "(1 / number of inputs: task arithmetic's mean of the task vectors) or a number; null is read "
        "as 'mean', its former meaning",
    )
    blockwise: bool = Field(
        default=True,
        description="one coefficient per task vector and parameter tensor (the paper's aTLAS); false: "
        "one per task vector (learned task arithmetic)",
    )

    @field_validator("init", mode="before")
    @classmethod
    def _null_init_is_mean(cls, value: object) -> object:
        return "mean" if value is None else value  # specs written when null meant 1 / number of inputs

    def needs_data(self) -> bool:
        return self.steps > 0

    def needs_loss(self) -> bool:
        return self.steps > 0 and not self.unlabelled  # labelled fit: the task's loss, not a guess at it


MergeConfig = Annotated[
    AverageConfig | TaskArithmeticConfig | TiesConfig | PleasConfig | AtlasConfig,
    Field(discriminator="method"),
]
