"""LoRA, EVA and CorDA: configured through HF peft, not reimplemented.

- LoRA (Hu et al., 2021): ``peft.LoraConfig`` + ``get_peft_model``.
- EVA (Paischer et al., 2024, "One Initialization to Rule them All"): peft's
  ``init_lora_weights="eva"`` + ``EvaConfig(rho=...)`` + ``initialize_lora_eva_weights`` over a
  few batches (SVD of the layer inputs; rank redistribution bounded by rho).
- CorDA (Yang et al., 2024, "Context-oriented Decomposition Adaptation"): peft's
  ``preprocess_corda`` (covariance of the layer inputs over a few batches) then
  ``init_lora_weights="corda"``. CorDA rewrites the base weights (residual W - BA), so the adapter
  is saved with peft's weight conversion: the saved adapter (rank 2r) applies to the original
  base model, which is what ``PeftModel.from_pretrained`` will be given.

Shared helpers used by the other LoRA-family methods live here too.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from algorithms.peft.base import Batch, InitBatches, PeftHandle

TASK_TYPES = {"seq_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", None: None}


def make_lora_config(
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str | None,
    task_type: str | None,
    **extra: Any,
) -> LoraConfig:
    """A ``peft.LoraConfig``; ``task_type`` is the Orchestra task name (or peft's own)."""
    peft_task = TASK_TYPES.get(task_type, task_type)
    return LoraConfig(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type=peft_task,
        **extra,
    )


@dataclass
class LoraPair:
    """One adapted linear layer: W' = W0 + scaling * B @ A (B: out x r, A: r x in)."""

    name: str
    layer: LoraLayer
    A: nn.Parameter
    B: nn.Parameter
    scaling: float

    @property
    def base_weight(self) -> torch.Tensor:
        weight = self.layer.get_base_layer().weight  # type: ignore[operator]
        assert isinstance(weight, torch.Tensor)
        return weight


def lora_pairs(model: nn.Module, adapter: str = "default") -> list[LoraPair]:
    """Every LoRA-adapted ``nn.Linear`` of a peft model, in module order."""
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            pairs.append(
                LoraPair(
                    name=name,
                    layer=mod,
                    A=mod.lora_A[adapter].weight,  # type: ignore[arg-type]
                    B=mod.lora_B[adapter].weight,  # type: ignore[arg-type]
                    scaling=float(mod.scaling[adapter]),
                )
            )
    if not pairs:
        raise ValueError("no LoRA layer found: check target_modules")
    return pairs


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str] | str:
    """peft's default targets for the model type when none are given (CorDA needs them early)."""
    if target_modules is not None:
        return target_modules
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ValueError(f"give target_modules: no peft default for model type {model_type!r}")
    return list(defaults[model_type])


def _take(batches: InitBatches, n: int) -> list[Batch]:
    if batches is None:
        raise ValueError("this method needs init_batches (a few training batches) to initialise")
    taken = list(itertools.islice(iter(batches), n))
    if not taken:
        raise ValueError("init_batches is empty")
    return taken


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str | None,
    merge_adapter: bool,
    task_type: str | None = None,
    name: str = "lora",
) -> PeftHandle:
    cfg = make_lora_config(
        r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, task_type=task_type
    )
    return PeftHandle(name=name, model=get_peft_model(model, cfg), merge_adapter=merge_adapter)


def apply_eva(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str | None,
    merge_adapter: bool,
    task_type: str | None = None,
    rho: float,
    init_batches: int,
    batches: InitBatches = None,
) -> PeftHandle:
    """EVA through peft: data-driven init from the SVD of the layer inputs."""
    from peft import EvaConfig, initialize_lora_eva_weights

    data = _take(batches, init_batches)
    # Sequence-classification labels are one per sequence, not per token: no label mask then.
    use_label_mask = task_type == "causal_lm"
    cfg = make_lora_config(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        task_type=task_type,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho, use_label_mask=use_label_mask),
    )
    peft_model = get_peft_model(model, cfg, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft_model, dataloader=data, show_progress_bar=False)
    return PeftHandle(name="eva", model=peft_model, merge_adapter=merge_adapter)


class CorDAHandle(PeftHandle):
    """CorDA's base weights are residuals: convert the adapter on save (see module docstring)."""

    initial_dir: Path | None = None

    def save_adapter(self, model: nn.Module, path: str | Path) -> Path:
        if self.merge_adapter or self.initial_dir is None:
            return super().save_adapter(model, path)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(  # type: ignore[operator]
            str(out), path_initial_model_for_weight_conversion=str(self.initial_dir)
        )
        return out


def apply_corda(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str | None,
    merge_adapter: bool,
    task_type: str | None = None,
    mode: str,
    init_batches: int,
    batches: InitBatches = None,
) -> PeftHandle:
    """CorDA through peft: context covariance over a few batches, then the CorDA init."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    data = _take(batches, init_batches)
    cfg = make_lora_config(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=resolve_targets(model, target_modules),
        task_type=task_type,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),  # type: ignore[arg-type]
    )

    @torch.no_grad()
    def run_model() -> None:
        # peft's CorDA hook takes one sequence per forward (it squeezes the batch dim): feed the
        # samples one at a time, cut to their real length so padding does not enter the covariance
        for batch in data:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask = inputs.get("attention_mask")
            for i in range(len(inputs["input_ids"])):
                n = int(mask[i].sum()) if mask is not None else inputs["input_ids"].shape[1]
                model(**{k: v[i : i + 1, :n] for k, v in inputs.items()})

    was_training = model.training
    model.eval()
    preprocess_corda(model, cfg, run_model=run_model)
    model.train(was_training)
    peft_model = get_peft_model(model, cfg)
    handle = CorDAHandle(name="corda", model=peft_model, merge_adapter=merge_adapter)
    # The initial adapter, saved before training: peft's conversion needs it at save time.
    initial = Path(tempfile.mkdtemp(prefix="corda_init_"))
    lora_cfg: Any = peft_model.peft_config["default"]
    init_flag = lora_cfg.init_lora_weights
    lora_cfg.init_lora_weights = True  # saved config must not re-run the CorDA init on load
    peft_model.save_pretrained(str(initial))
    lora_cfg.init_lora_weights = init_flag
    handle.initial_dir = initial
    weakref.finalize(handle, shutil.rmtree, initial, ignore_errors=True)
    return handle
