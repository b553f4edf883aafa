"""The ``deepspeed`` strategy: the spec's model inside a DeepSpeed engine, for the training loop.

``DeepSpeedModel(spec, model, device)`` builds the client optimizer from the spec, the DeepSpeed
config from ``service.spec.deepspeed_rules.merged_config`` (the spec's values, tuned defaults, the
spec's raw fragment), and initialises the engine on the process group Ray Train (or ``torchrun``)
already set up: gloo on CPU, NCCL on GPU, any number of ranks. The loop then calls:

- ``backward(loss, boundary=...)`` for each micro-batch (the loop already divided the loss by the
  accumulation steps); the last micro-batch is the accumulation boundary, where ZeRO reduces;
- ``step(forward_backward)``: runs the loop's closure, then the engine's step (clipping, optimizer,
  zeroing); closure optimizers (SAM, AdaZo-SAM, LORENZA) get the closure instead;
- ``save_and_report(step=, scheduler=)``: DeepSpeed's sharded checkpoint, every rank writing its own
  shards into its own folder, reported to Ray Train, which merges the ranks' folders into one
  checkpoint; ``restore()`` loads the last one after a restart;
- ``consolidated_model()``: the whole model for the MLflow artifact (ZeRO-3: the 16-bit weights
  gathered layer by layer onto rank 0; every rank must call it).

Optimizers: ``adamw`` runs as DeepSpeed's FusedAdam on GPU (its CUDA op is compiled just in time;
torch's fused AdamW if that fails), as DeepSpeedCPUAdam with ``offload_optimizer``, and as torch's
AdamW on CPU (no op to compile). Every other optimizer is the registry's, passed as a client
optimizer. Projected optimizers (GaLore, DCT, LORENZA) at ZeRO 1/2 run as DeepSpeed stage 0 with
``PartitionedOptimizer`` (optimizer state partitioned by whole matrices); see
``service/spec/deepspeed_rules.py`` for the modes and what is rejected.
"""

import argparse
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.spec import ExperimentSpec
from service.spec.deepspeed_rules import (
    deepspeed_precision,
    engine_stage,
    merged_config,
    partitions_optimizer,
    whole_params_reason,
)
from workers.schedule import build_scheduler

Closure = Callable[..., torch.Tensor]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_FILE = "optimizer_rank{rank}.pt"  # per-rank state of PartitionedOptimizer


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed for this device and join the existing process group (or create it)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        # CPU ranks talk over gloo. DeepSpeed's shared-memory all-reduce op (inference only) would be
        # compiled just in time at the first init; nothing here uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    return deepspeed


def build_client_optimizer(spec: ExperimentSpec, model: nn.Module, device: torch.device,
                           peft_handle: Any = None) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed steps (see the module docstring for which one)."""
    from algorithms.optimizers.registry import OPTIMIZERS

    cfg = spec.optimizer
    assert cfg is not None
    params: Any = (peft_handle.param_groups(model, cfg.lr) if peft_handle is not None
                   else [p for p in model.parameters() if p.requires_grad])
    if partitions_optimizer(spec):
        from algorithms.optimizers.partitioned import PartitionedOptimizer

        return PartitionedOptimizer(params, lambda inner: OPTIMIZERS.build(cfg, inner), group=None)  # type: ignore[no-any-return,arg-type]
    if cfg.name == "adamw" and device.type == "cuda":
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps,  # type: ignore[attr-defined]
                  "weight_decay": cfg.weight_decay}
        ds = spec.distributed.deepspeed
        if ds is not None and ds.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)  # type: ignore[no-any-return]
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kwargs)  # type: ignore[no-any-return]
        except Exception as exc:  # the JIT build needs nvcc and ninja
            warnings.warn(f"DeepSpeed FusedAdam unavailable ({exc}); using torch's fused AdamW", stacklevel=2)
            return torch.optim.AdamW(params, fused=True, **kwargs)
    return OPTIMIZERS.build(cfg, params)


def memory_estimate(spec: ExperimentSpec, model: nn.Module, device: torch.device) -> tuple[float, float] | None:
    """(bytes one GPU needs without activation checkpointing, bytes free now), or None off GPU or
    for models that are not transformers decoders/encoders with a config.

    Model states per parameter by ZeRO stage (bf16 weights and gradients, fp32 master weights and
    Adam moments; less what is offloaded), plus activations of one micro-batch: 34 s b h bytes per
    layer (Korthikanti et al. 2022, with the s^2 attention-score term left out: SDPA's fused kernels
    do not keep the scores) and the logits (s b V, in 16 and 32 bits).
    """
    cfg = getattr(model, "config", None)
    if device.type != "cuda" or cfg is None or spec.train is None:
        return None
    hidden, layers = getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None)
    if not hidden or not layers:
        return None
    seq = int(getattr(spec.task.dataset, "seq_len", 0) or getattr(spec.task.dataset, "max_length", 0) or 0)
    world = spec.distributed.num_workers
    micro = spec.train.batch_size // (world * spec.train.grad_accum)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    ds = spec.distributed.deepspeed
    stage = engine_stage(spec)
    optim = 0.0 if ds is not None and ds.offload_optimizer else 12.0
    weights = 0.0 if ds is not None and ds.offload_params else 2.0
    per_param = {0: weights + 2 + optim, 1: weights + 2 + optim / world, 2: weights + (2 + optim) / world,
                 3: (weights + 2 + optim) / world}[stage]
    states = n * per_param + frozen * 2
    vocab = getattr(cfg, "vocab_size", 0) or 0
    activations = 34.0 * seq * micro * hidden * layers + 6.0 * seq * micro * vocab
    free, _ = torch.cuda.mem_get_info(device)
    return states + activations, float(free)


class _LoopOptimizer:
    """What the loop's closure sees as ``optimizer``: DeepSpeed clears gradients after each step,
    so ``zero_grad`` matters only for closure optimizers, which re-run the closure."""

    def __init__(self, owner: "DeepSpeedModel") -> None:
        self.owner = owner

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.owner.needs_closure:
            for p in self.owner.engine.module.parameters():
                p.grad = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.owner.client.param_groups  # type: ignore[no-any-return]


class DeepSpeedModel:
    def __init__(self, spec: ExperimentSpec, model: nn.Module, device: torch.device, peft_handle: Any = None) -> None:
        assert spec.train is not None
        self.spec, self.device = spec, device
        self.deepspeed = import_deepspeed(device)
        import torch.distributed as dist

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        ds = spec.distributed.deepspeed
        asked = ds is not None and ds.activation_checkpointing
        estimate = memory_estimate(spec, model, device)
        if not asked and estimate is not None and estimate[0] > 0.85 * estimate[1]:
            print(f"[orchestra] deepspeed: activation checkpointing on: about {estimate[0] / 2**30:.1f} GiB needed "
                  f"per GPU without it, {estimate[1] / 2**30:.1f} GiB free", flush=True)
            asked = True
        if asked:
            enable = getattr(model, "gradient_checkpointing_enable", None)
            if enable is None:
                warnings.warn("activation_checkpointing: this model has no gradient_checkpointing_enable; "
                              "training without it", stacklevel=2)
            else:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.whole_params = whole_params_reason(spec) is not None
        self.partitioned = partitions_optimizer(spec)
        self.stage = engine_stage(spec)
        self.config = merged_config(spec)
        self.client = build_client_optimizer(spec, model, device, peft_handle)
        self.needs_closure = bool(getattr(self.client, "needs_closure", False))
        args = argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None
        engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=self.client, config=self.config,
                                                    args=args, dist_init_required=False)
        self.engine = engine
        if spec.derived().exchange != "none":
            # The loop's gradient exchange combines the ranks' own gradients: no all-reduce first.
            engine.enable_backward_allreduce = False
        if spec.train.compile:
            engine.compile()
        self.model: nn.Module = engine
        self.optimizer: Any = _LoopOptimizer(self)
        self.scheduler = build_scheduler(self.client, spec.train)

    # ---- what the loop reads ------------------------------------------------------------------

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """torch autocast for the loop: where DeepSpeed does not do mixed precision itself (whole-
        parameter mode), or for float inputs (DeepSpeed casts the weights, not the inputs)."""
        assert self.spec.train is not None
        precision = self.spec.train.precision
        if precision == "fp32":
            return None
        if deepspeed_precision(self.spec) is None or self.spec.task.kind == "image_classification":
            return _AUTOCAST[precision]
        return None

    @property
    def eval_on_all_ranks(self) -> bool:
        """ZeRO-3's forward gathers parameters with collectives: every rank must run evaluation."""
        return self.stage == 3

    # ---- one optimizer step -------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, forward_backward: Closure) -> torch.Tensor:
        if self.needs_closure:
            return self.client.step(forward_backward)  # type: ignore[arg-type,return-value]
        loss = forward_backward(True)
        self.engine.step()
        return loss

    # ---- checkpoints --------------------------------------------------------------------------

    def save_and_report(self, *, step: int, scheduler: Any, metrics: dict[str, float] | None = None) -> None:
        """Every rank writes its shards into its own folder; Ray Train merges them into one checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=f"step{step}",
                                        client_state={"step": step, "scheduler": scheduler.state_dict()})
            if self.partitioned:
                torch.save(self.client.state_dict(), os.path.join(tmp, OPTIMIZER_FILE.format(rank=self.rank)))
            ray.train.report({**(metrics or {}), "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def restore(self) -> int:
        """Load the last reported checkpoint, if any; returns the step to resume from (0 if none)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as folder:
            path, client_state = self.engine.load_checkpoint(
                folder, load_optimizer_states=not self.partitioned, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint in {folder}")
            if self.partitioned:
                state = torch.load(os.path.join(folder, OPTIMIZER_FILE.format(rank=self.rank)), map_location="cpu",
                                   weights_only=False)
                self.client.load_state_dict(state)
        self.scheduler.load_state_dict(client_state["scheduler"])
        return int(client_state["step"])

    # ---- the final model ----------------------------------------------------------------------

    def consolidated_model(self) -> nn.Module:
        """The whole trained model on rank 0 (other ranks get their engine's module back)."""
        module: nn.Module = self.engine.module
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if self.rank != 0:
                return module
            module = _assemble(self.spec, state, buffers=dict(module.named_buffers())).to(self.device)
        if self.spec.task.kind == "image_classification" and deepspeed_precision(self.spec) is not None:
            module = module.float()  # float inputs: evaluate in fp32
        return module


def _assemble(spec: ExperimentSpec, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> nn.Module:
    """A model skeleton built on the meta device (no second copy of the weights in host memory),
    given the gathered tensors; non-persistent buffers (rotary tables) come from the engine's module."""
    from workers.tasks import build_task

    with torch.device("meta"):
        fresh = build_task(spec).build_model()
    fresh.load_state_dict(state, assign=True)
    for name, buf in buffers.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = fresh.get_submodule(owner_name)
        if owner._buffers.get(leaf) is not None and owner._buffers[leaf].is_meta:  # type: ignore[union-attr]
            owner._buffers[leaf] = buf.detach().to("cpu").clone()
    missing = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if missing:
        raise RuntimeError(f"consolidated model lacks {missing[:5]}")
    return fresh
