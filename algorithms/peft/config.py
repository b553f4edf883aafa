"""PEFT methods: hyperparameters only (no torch import here).

Each model's fields (less ``name``) are what the method's builder in ``registry.py`` passes on;
the papers each follows are named in the method modules. What a method needs from the run is
declared on its config (class attributes, and ``init_batches_needed`` for the training batches of
a data-driven initialisation), and the spec's rules and the worker ask the config.
"""

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from algorithms._config import StrictModel


class PeftBase(StrictModel):
    DISCRIMINATOR: ClassVar[str] = "name"
    # Hooks that only initialise let DeepSpeed (ZeRO 0-2) own the parameters and the step; a
    # method that reads or rewrites whole weights or gradients of single tensors, or hooks the
    # optimizer step (ALLoRA, OwLore), does not survive ZeRO's partitions.
    RUNS_UNDER_DEEPSPEED: ClassVar[bool] = False
    # Edits gradients or weights between backward and the step, or changes which parameters are
    # trainable from step to step (DeepSpeed then needs whole parameters on every rank).
    EDITS_GRADIENTS: ClassVar[bool] = False
    # Changes the trainable set while training, which DDP fixes when it wraps the model.
    CHANGES_TRAINABLE_SET: ClassVar[bool] = False
    # Reads gradients after backward, before a loss scaler would unscale them.
    TOLERATES_LOSS_SCALING: ClassVar[bool] = True
    # The adapted model computes what the base model did until the first step (LoRA's B = 0, CorDA's
    # residual base, layer-wise methods that only choose what trains); the contract test holds it.
    KEEPS_OUTPUT_AT_INIT: ClassVar[bool] = True

    name: str

    def init_batches_needed(self, batch_size: int) -> int:
        """Training batches (of ``batch_size`` samples) its initialisation reads; 0: none."""
        return 0

    def check_distributed(self, strategy: str, zero_stage: int | None, num_workers: int, precision: str) -> None:
        """Raise ValueError when this method cannot run under the strategy / ZeRO stage / workers / precision."""
        if strategy == "deepspeed" and not self.RUNS_UNDER_DEEPSPEED:
            raise ValueError(f"{self.name!r} needs strategy ddp (with deepspeed use one of "
                             f"{', '.join(deepspeed_methods())})")
        if strategy == "deepspeed" and zero_stage == 3:
            raise ValueError("peft with ZeRO stage 3 is not supported: the adapter is saved from the "
                             "unpartitioned model (use zero_stage 0-2)")
        if self.CHANGES_TRAINABLE_SET and num_workers > 1:
            raise ValueError(f"{self.name!r} changes the trainable layers as it trains, which DDP does "
                             "not allow: use num_workers 1")
        if precision == "fp16" and not self.TOLERATES_LOSS_SCALING:
            raise ValueError(f"{self.name!r} does not support precision fp16 (loss scaling: it reads the "
                             "gradients before they are unscaled): use bf16 or fp32")


class LoRABase(PeftBase):
    name: str
    r: int = Field(default=8, ge=1, le=4096)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = None
    merge_adapter: bool = False


class LoRAConfig(LoRABase):
    RUNS_UNDER_DEEPSPEED: ClassVar[bool] = True

    name: Literal["lora"]


class EVAConfig(LoRABase):
    RUNS_UNDER_DEEPSPEED: ClassVar[bool] = True

    name: Literal["eva"]
    rho: float = Field(default=2.0, ge=1.0)
    init_batches: int = Field(default=4, ge=1)

    def init_batches_needed(self, batch_size: int) -> int:
        return self.init_batches


class CorDAConfig(LoRABase):
    RUNS_UNDER_DEEPSPEED: ClassVar[bool] = True

    name: Literal["corda"]
    mode: Literal["ipm", "kpm"] = "ipm"
    init_batches: int = Field(default=4, ge=1)

    def init_batches_needed(self, batch_size: int) -> int:
        return self.init_batches


class LoRAGGPOConfig(LoRABase):
    EDITS_GRADIENTS: ClassVar[bool] = True
    # its gradient-norm EMA would read the loss-scaled gradients (after_backward runs before unscale)
    TOLERATES_LOSS_SCALING: ClassVar[bool] = False

    name: Literal["lora_ggpo"]
    rho: float = Field(default=0.05, gt=0.0, description=(
        "perturbation radius: eps = -rho * v / ||v|| * min(10, 1/gbar), v the optimizer momentum in "
        "weight space (LoRA-MGPO, the authors' release). Authors: 0.05 for NLU, 0.01 for NLG"))
    beta: float = Field(default=0.9, ge=0.0, lt=1.0, description=(
        "EMA factor of the layer gradient norm gbar. Authors: 0.9 for NLU (with AdamW beta1 0.9), "
        "0.8 for NLG (with AdamW beta1 0.8)"))


class LoRAProConfig(LoRABase):
    EDITS_GRADIENTS: ClassVar[bool] = True

    name: Literal["lora_pro"]
    damping: float = Field(default=1e-8, gt=0.0, lt=1.0, description=(
        "ridge on the r x r Gram matrices B^T B and A A^T, relative to their mean diagonal "
        "(the authors' 1e-8)"))


class ALLoRAConfig(LoRABase):
    name: Literal["allora"]
    eta: float = Field(default=1.0, gt=0.0, description=(
        "each row of a LoRA matrix moves with lr_row = lr / sqrt(||row||^2 + 1/eta^2)"))

    @model_validator(mode="after")
    def _no_dropout(self) -> "ALLoRAConfig":
        if self.dropout != 0.0:
            raise ValueError("ALLoRA is dropout-free: dropout must be 0 (alpha is ignored: no scaling)")
        return self


class LoRASBConfig(LoRABase):
    RUNS_UNDER_DEEPSPEED: ClassVar[bool] = True
    KEEPS_OUTPUT_AT_INIT: ClassVar[bool] = False  # starts at the best rank-r estimate of a first update

    name: Literal["lora_sb"]
    init_samples: int = Field(default=170, ge=1, description=(
        "training samples whose gradient estimates the first full update (the authors: 50 to 170, "
        "170 in their code); the worker fetches enough batches"))
    init_batches: int | None = Field(default=None, ge=1, description=(
        "at most this many batches for init_samples (default: as many as init_samples needs)"))
    init_update: Literal["sign", "gradient"] = Field(default="sign", description=(
        "first update estimated as -init_lr * sign(summed gradient) (the authors', Adam's first "
        "step) or as -init_lr * mean gradient (an SGD step)"))
    init_lr: float = Field(default=1e-3, gt=0.0, description="lr of the approximated first full step")

    def init_batches_needed(self, batch_size: int) -> int:
        """Counts samples: enough batches to hold ``init_samples`` unless ``init_batches`` caps them."""
        return self.init_batches or -(-self.init_samples // batch_size)


class LISAConfig(PeftBase):
    EDITS_GRADIENTS: ClassVar[bool] = True
    CHANGES_TRAINABLE_SET: ClassVar[bool] = True

    name: Literal["lisa"]
    n_layers: int = Field(default=2, ge=1, description="blocks trained at a time, sampled uniformly "
                          "without replacement (the authors: 2)")
    interval: int = Field(default=20, ge=1, description="steps between resamplings (the authors: 20)")
    seed: int = Field(default=0, ge=0)


class OwLoreConfig(PeftBase):
    EDITS_GRADIENTS: ClassVar[bool] = True
    CHANGES_TRAINABLE_SET: ClassVar[bool] = True

    name: Literal["owlore"]
    n_layers: int = Field(default=5, ge=1, description="blocks trained at a time, sampled without "
                          "replacement with probability proportional to their outlier ratio (the authors: 5)")
    interval: int = Field(default=50, ge=1, description="steps between resamplings (the authors: 50)")
    outlier_threshold: float = Field(default=7.0, gt=0.0, description="tau: |w| > tau * mean |w|")
    rank: int = Field(default=256, ge=1, description="GaLore rank of the sampled matrices (the authors: 256)")
    update_proj_gap: int = Field(default=100, ge=1, description="steps between GaLore projector updates "
                                 "(the authors: 100)")
    scale: float = Field(default=1.0, gt=0.0, description="GaLore update scale (the authors: 1.0)")
    init_batches: int = Field(default=0, ge=0, description="batches for input norms; 0: weights only")
    seed: int = Field(default=0, ge=0)

    def init_batches_needed(self, batch_size: int) -> int:
        return self.init_batches


PeftConfig = Annotated[
    LoRAConfig
    | EVAConfig
    | CorDAConfig
    | LoRAGGPOConfig
    | LoRAProConfig
    | ALLoRAConfig
    | LoRASBConfig
    | LISAConfig
    | OwLoreConfig,
    Field(discriminator="name"),
]


def deepspeed_methods() -> list[str]:
    """The methods whose configs say they run under strategy deepspeed."""
    members: tuple[type[PeftBase], ...] = get_args(get_args(PeftConfig)[0])
    return sorted(get_args(m.model_fields["name"].annotation)[0] for m in members if m.RUNS_UNDER_DEEPSPEED)
