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
    rho: float = Field(default=0.05, gt=0.0, description="perturbation radius")
    beta: float = Field(default=0.5, ge=0.0, le=1.0, description="gradient vs weight norm mix")
    seed: int = Field(default=0, ge=0, description="seed of the perturbation noise (same on all ranks)")


class LoRAProConfig(LoRABase):
    name: Literal["lora_pro"]
    damping: float = Field(default=1e-6, gt=0.0, lt=1.0, description="ridge on the r x r Gram matrices")


class ALLoRAConfig(LoRABase):
    name: Literal["allora"]
    eta: float = Field(default=1.0, gt=0.0, description="lr_p = lr / sqrt(||p||^2 + 1/eta^2)")

    @model_validator(mode="after")
    def _no_dropout(self) -> "ALLoRAConfig":
        if self.dropout != 0.0:
            raise ValueError("ALLoRA is dropout-free: dropout must be 0 (alpha is ignored: no scaling)")
        return self


class LoRASBConfig(LoRABase):
    name: Literal["lora_sb"]
    init_batches: int = Field(default=1, ge=1)
    init_lr: float = Field(default=1e-3, gt=0.0, description="lr of the approximated first full step")


class LISAConfig(_DistributedRules):
    name: Literal["lisa"]
    n_layers: int = Field(default=2, ge=1)
    interval: int = Field(default=20, ge=1)
    seed: int = Field(default=0, ge=0)


class OwLoreConfig(_DistributedRules):
    name: Literal["owlore"]
    n_layers: int = Field(default=2, ge=1)
    interval: int = Field(default=20, ge=1)
    outlier_threshold: float = Field(default=7.0, gt=0.0, description="tau: |w| > tau * mean |w|")
    rank: int = Field(default=8, ge=1)
    update_proj_gap: int = Field(default=200, ge=1)
    scale: float = Field(default=0.25, gt=0.0)
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
