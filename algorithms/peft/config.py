"""PEFT methods: hyperparameters only (no torch import here).

Each model's fields (less ``name``) are the keyword arguments of the method's builder in
``registry.py``; the papers each follows are named in the method modules.
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from algorithms._config import StrictModel

# Methods whose hooks only initialise: DeepSpeed (ZeRO 0-2) can own their parameters and step.
# The others read or rewrite whole weights or gradients of single tensors, or their optimizer
# step (ALLoRA, OwLore), which ZeRO partitions; LISA/OwLore change the trainable set while
# training, which DDP fixes when it wraps the model.
DEEPSPEED_OK = frozenset({"lora", "eva", "corda", "lora_sb"})
SINGLE_WORKER = frozenset({"lisa", "owlore"})


class _DistributedRules(StrictModel):
    name: str

    def check_distributed(self, strategy: str, zero_stage: int | None, num_workers: int) -> None:
        """Raise ValueError when this method cannot run under the strategy / ZeRO stage / workers."""
        if strategy == "deepspeed" and self.name not in DEEPSPEED_OK:
            raise ValueError(f"{self.name!r} needs strategy ddp (with deepspeed use one of "
                             f"{', '.join(sorted(DEEPSPEED_OK))})")
        if strategy == "deepspeed" and zero_stage == 3:
            raise ValueError("peft with ZeRO stage 3 is not supported: the adapter is saved from the "
                             "unpartitioned model (use zero_stage 0-2)")
        if self.name in SINGLE_WORKER and num_workers > 1:
            raise ValueError(f"{self.name!r} changes the trainable layers as it trains, which DDP does "
                             "not allow: use num_workers 1")


class LoRABase(_DistributedRules):
    name: str
    r: int = Field(default=8, ge=1, le=4096)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = None
    merge_adapter: bool = False


class LoRAConfig(LoRABase):
    name: Literal["lora"]


class EVAConfig(LoRABase):
    name: Literal["eva"]
    rho: float = Field(default=2.0, ge=1.0)
    init_batches: int = Field(default=4, ge=1)


class CorDAConfig(LoRABase):
    name: Literal["corda"]
    mode: Literal["ipm", "kpm"] = "ipm"
    init_batches: int = Field(default=4, ge=1)


class LoRAGGPOConfig(LoRABase):
    name: Literal["lora_ggpo"]
    rho: float = Field(default=0.05, gt=0.0, description=(
        "perturbation radius: eps = -rho * v / ||v|| * min(10, 1/gbar), v the optimizer momentum in "
        "weight space (LoRA-MGPO, the authors' release). Authors: 0.05 for NLU, 0.01 for NLG"))
    beta: float = Field(default=0.9, ge=0.0, lt=1.0, description=(
        "EMA factor of the layer gradient norm gbar. Authors: 0.9 for NLU (with AdamW beta1 0.9), "
        "0.8 for NLG (with AdamW beta1 0.8)"))


class LoRAProConfig(LoRABase):
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


class LISAConfig(_DistributedRules):
    name: Literal["lisa"]
    n_layers: int = Field(default=2, ge=1, description="blocks trained at a time, sampled uniformly "
                          "without replacement (the authors: 2)")
    interval: int = Field(default=20, ge=1, description="steps between resamplings (the authors: 20)")
    seed: int = Field(default=0, ge=0)


class OwLoreConfig(_DistributedRules):
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
