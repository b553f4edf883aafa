"""The ``deepspeed`` strategy: the spec's model inside a DeepSpeed engine, for the training loop.

``DeepSpeedStrategy(spec, plan, model, device, exchange=...)`` builds the client optimizer from the
spec, the DeepSpeed config from ``service.spec.deepspeed_rules.merged_config`` (the spec's values,
tuned defaults, the spec's raw fragment), and initialises the engine on the process group Ray Train
(or ``torchrun``) already set up: gloo on CPU, NCCL on GPU, any number of ranks. For the loop
(``workers.strategy.base.Strategy``):

- ``backward(loss, last=...)`` for each micro-batch (the loop already divided the loss by the
  accumulation steps); the last micro-batch is the accumulation boundary, where ZeRO reduces;
- ``step(forward_backward, step)``: runs the loop's closure (and the gradient exchange after it,
  when one runs: the engine's all-reduce is then off), then the engine's step (clipping, optimizer,
  zeroing) and the schedule; closure optimizers (SAM, AdaZo-SAM, LORENZA) get the closure instead;
- ``save(step=, metrics=)``: DeepSpeed's sharded checkpoint, every rank writing its own shards into
  its own folder, reported to Ray Train, which merges the ranks' folders into one checkpoint;
  ``restore()`` loads the last one after a restart;
- ``final_model()``: the whole model for the MLflow artifact (ZeRO-3: the 16-bit weights gathered
  layer by layer onto rank 0; every rank must call it).

Optimizers: ``adamw`` runs as DeepSpeed's FusedAdam on GPU (its CUDA op is compiled just in time;
torch's fused AdamW if that fails), as DeepSpeedCPUAdam with ``offload_optimizer``, and as torch's
AdamW on CPU (no op to compile). Every other optimizer is the registry's, passed as a client
optimizer. Projected optimizers (GaLore, DCT, LORENZA) at ZeRO 1/2 run as DeepSpeed stage 0 with
``PartitionedOptimizer`` (optimizer state partitioned by whole matrices); see
``service/spec/deepspeed_rules.py`` for the modes and what is rejected.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from service.spec import ExperimentSpec
from service.spec.deepspeed_rules import (
    deepspeed_precision,
    merged_config,
    partitions_optimizer,
)
from workers.plan import RunPlan
from workers.schedule import build_scheduler
from workers.strategy.base import AUTOCAST, Closure, Exchange, autocast, exchanged, state_bytes

log = logging.getLogger(__name__)
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


def memory_estimate(spec: ExperimentSpec, stage: int, model: nn.Module,
                    device: torch.device) -> tuple[float, float] | None:
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
    data = getattr(spec.task, "dataset", None)  # a custom task's data is the user's: no known length
    seq = int(getattr(data, "seq_len", 0) or getattr(data, "max_length", 0) or 0)
    world = spec.distributed.num_workers
    micro = spec.train.batch_size // (world * spec.train.grad_accum)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    ds = spec.distributed.deepspeed
    optim = 0.0 if ds is not None and ds.offload_optimizer else 12.0
    weights = 0.0 if ds is not None and ds.offload_params else 2.0
    per_param = {0: weights + 2 + optim, 1: weights + 2 + optim / world, 2: weights + (2 + optim) / world,
                 3: (weights + 2 + optim) / world}[stage]
    states = n * per_param + frozen * 2
    vocab = getattr(cfg, "vocab_size", 0) or 0
    activations = 34.0 * seq * micro * hidden * layers + 6.0 * seq * micro * vocab
    free, _ = torch.cuda.mem_get_info(device)
    return states + activations, float(free)


class DeepSpeedStrategy:
    def __init__(self, spec: ExperimentSpec, plan: RunPlan, model: nn.Module, device: torch.device, *,
                 exchange: Exchange | None, peft_handle: Any = None) -> None:
        assert spec.train is not None and plan.zero_stage is not None
        self.spec, self.device, self.exchange, self.stage = spec, device, exchange, plan.zero_stage
        self.deepspeed = import_deepspeed(device)
        import torch.distributed as dist

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        _activation_checkpointing(spec, self.stage, model, device)
        self.partitioned = partitions_optimizer(spec)
        self.config = merged_config(spec)
        self.client = build_client_optimizer(spec, model, device, peft_handle)
        self.needs_closure = bool(getattr(self.client, "needs_closure", False))
        args = argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None
        engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=self.client, config=self.config,
                                                    args=args, dist_init_required=False)
        self.engine = engine
        if exchange is not None:
            # The exchange combines the ranks' own gradients: no all-reduce first.
            engine.enable_backward_allreduce = False
        if spec.train.compile:
            engine.compile()
        self.model: nn.Module = engine
        self.scheduler = build_scheduler(self.client, spec.train)
        # torch autocast where DeepSpeed does not do mixed precision itself (whole-parameter mode), or
        # for float inputs (DeepSpeed casts the weights, not the inputs)
        precision = spec.train.precision
        self.dtype = None
        if precision != "fp32" and (deepspeed_precision(spec) is None or spec.task.kind == "image_classification"):
            self.dtype = AUTOCAST[precision]
        # ZeRO-3's forward gathers parameters with collectives: every rank must run evaluation
        self.eval_on_all_ranks = self.stage == 3

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device, self.dtype)

    # ---- one optimizer step -------------------------------------------------------------------

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients after each step; closure optimizers re-run the closure."""
        if self.needs_closure:
            for p in self.engine.module.parameters():
                p.grad = None

    def backward(self, loss: Tensor, *, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, forward_backward: Closure, step: int) -> tuple[Tensor, dict[str, float]]:
        metrics: dict[str, float] = {}
        closure = exchanged(forward_backward, self.exchange, self.model, step, metrics)
        if self.needs_closure:
            loss: Tensor = self.client.step(closure)  # type: ignore[arg-type,assignment]
        else:
            loss = closure(True)
            self.engine.step()
        self.scheduler.step()
        return loss, metrics

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, *, step: int, metrics: dict[str, float]) -> None:
        """Every rank writes its shards into its own folder; Ray Train merges them into one checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=f"step{step}",
                                        client_state={"step": step, "scheduler": self.scheduler.state_dict()})
            if self.partitioned:
                torch.save(self.client.state_dict(), os.path.join(tmp, OPTIMIZER_FILE.format(rank=self.rank)))
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def restore(self) -> int:
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

    def optimizer_state_bytes(self) -> int:
        # the ZeRO optimizer wraps the torch optimizer that holds this rank's partition of the state
        wrapper = self.engine.optimizer
        return state_bytes(getattr(wrapper, "optimizer", wrapper))

    def final_model(self) -> nn.Module:
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


def _activation_checkpointing(spec: ExperimentSpec, stage: int, model: nn.Module, device: torch.device) -> None:
    """On when the spec asks, or when the memory estimate says the GPU would not hold the run without it."""
    ds = spec.distributed.deepspeed
    asked = ds is not None and ds.activation_checkpointing
    estimate = memory_estimate(spec, stage, model, device)
    if not asked and estimate is not None and estimate[0] > 0.85 * estimate[1]:
        log.warning("deepspeed: activation checkpointing on: about %.1f GiB needed per GPU without it, "
                    "%.1f GiB free", estimate[0] / 2**30, estimate[1] / 2**30)
        asked = True
    if not asked:
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        warnings.warn("activation_checkpointing: this model has no gradient_checkpointing_enable; "
                      "training without it", stacklevel=3)
    else:
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
