"""The per-worker training loop that Ray Train runs (strategies ``ddp`` and ``deepspeed``).

Reads top down: build the task and model, hand the model to the strategy (which wraps it and owns
the optimizer, the schedule, the gradient exchange and the checkpoints), restore the last
checkpoint, then step: forward and backward over the micro-batches, the strategy's optimizer step;
log, evaluate and checkpoint on the plan's cadence; log from rank 0.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from service.spec import ExperimentSpec
from workers import checkpoint, peft_hooks
from workers.cadence import Window
from workers.faults import Straggler, maybe_fail_job, maybe_kill
from workers.mlflow_log import RunLogger
from workers.model_io import save_final_model
from workers.plan import RunPlan
from workers.settings import settings, setup_logging
from workers.strategy import build_strategy
from workers.strategy.base import Strategy
from workers.tasks import build_task
from workers.tasks.base import Task, to_device


class NoPeft:
    """The PEFT hooks of a run without PEFT."""

    def on_step_start(self, step: int, model: torch.nn.Module) -> None: ...
    def before_backward(self, step: int, model: torch.nn.Module) -> None: ...
    def after_backward(self, step: int, model: torch.nn.Module) -> None: ...


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: ``spec`` (the typed ExperimentSpec), ``mlflow_uri``,
    ``mlflow_run_id``, and optionally ``log_spec`` and ``report_eval`` (a sweep trial: every
    evaluation is reported to Ray, for Tune's scheduler)."""
    import ray.train
    import ray.train.torch

    setup_logging()
    spec: ExperimentSpec = config["spec"]
    plan, train = RunPlan.from_spec(spec), spec.train
    assert train is not None and spec.optimizer is not None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logger = RunLogger(config["mlflow_uri"], config["mlflow_run_id"], enabled=rank == 0)
    if rank == 0 and config.get("log_spec", True):
        logger.log_spec(spec.resolved())

    torch.manual_seed(train.seed)  # identical initial weights on every rank
    task = build_task(spec)
    model, peft_handle = task.build_model(), None
    if spec.peft is not None:
        model, peft_handle = peft_hooks.apply_peft(spec, model, task)
    hooks = peft_handle or NoPeft()
    sizes: dict[str, float] = {"model/params": sum(p.numel() for p in model.parameters()),  # before ZeRO-3 shards
                               "model/trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    strategy = build_strategy(spec, plan, model, device, rank=rank, world=world, peft_handle=peft_handle)
    start = strategy.restore()
    logger.metrics(sizes, step=start)
    batches = task.batches(rank=rank, world=world, batch_size=train.batch_size // (world * train.grad_accum),
                           seed=train.seed + 17 * start, label_flip=rank in plan.label_flip_ranks)
    straggler = Straggler(spec.faults, rank, world)
    logger.set_tags({"orchestra.world_size": str(world)})

    cadence, window = plan.cadence, Window(train.batch_size, task.tokens_per_sample, device)
    metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}  # rank 0's latest evaluation, carried by checkpoint reports
    strategy.model.train()
    for step in range(start, train.max_steps):
        maybe_kill(spec.faults, rank=rank, step=step, restored=start > 0)
        hooks.on_step_start(step, strategy.model)
        micro = [to_device(next(batches), device) for _ in range(train.grad_accum)]
        closure = partial(forward_backward, strategy, task, micro, step=step, hooks=hooks, straggler=straggler)
        loss, exchanged = strategy.step(closure, step)
        metrics.update(exchanged)
        window.add(float(loss))
        done = step + 1
        if step == start:  # the state exists once the optimizer has stepped
            metrics["optimizer/state_mib"] = strategy.optimizer_state_bytes() / 2**20
        if cadence.log(done):
            logger.metrics({**metrics, **window.metrics(strategy.lr)}, step=done)
            metrics = {}
        if cadence.eval(done):
            evaluated: dict[str, float] = {}
            if rank == 0 or strategy.eval_on_all_ranks:  # ZeRO-3: a collective
                evaluated = last_eval = task.evaluate(checkpoint.unwrap(strategy.model), device, train.eval_batches)
                logger.metrics(evaluated, step=done)
            logger.flush()
            if config.get("report_eval"):  # a sweep trial: Tune's scheduler sees every evaluation
                ray.train.report({"step": done, **evaluated})
        if cadence.checkpoint(done):
            logger.flush()
            strategy.save(step=done, metrics={"train/loss": float(loss), **last_eval})
            maybe_fail_job(spec.faults, rank=rank, attempt=settings().attempt)
    final = strategy.final_model()
    if rank == 0:
        logger.metrics(task.evaluate(final, device, train.eval_batches), step=train.max_steps)
        save_final_model(logger, spec, final, peft_handle)
        logger.flush(wait=True)


def forward_backward(strategy: Strategy, task: Task, micro: list[Any], backward: bool = True, *, step: int,
                     hooks: Any, straggler: Straggler) -> torch.Tensor:
    """The step's micro-batches forward (and backward): the closure of the optimizer step, which a
    closure optimizer (SAM) runs again on perturbed weights. Returns the step's mean loss."""
    total = torch.zeros((), device=strategy.device)
    strategy.zero_grad()
    for i, batch in enumerate(micro):
        with strategy.autocast():
            loss = task.loss(strategy.model, batch) / len(micro)
        if backward:
            if i == 0:
                hooks.before_backward(step, strategy.model)
            strategy.backward(loss, last=i == len(micro) - 1)
        total += loss.detach()
    if backward:
        straggler.delay()
        hooks.after_backward(step, strategy.model)
    return total
