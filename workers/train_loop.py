"""The per-worker training loop that Ray Train runs (strategies ``ddp`` and ``deepspeed``).

Reads top down: build the task and model, wrap it for the strategy, build the optimizer, restore
the last checkpoint, then step: forward, backward, gradient exchange, optimizer; log from rank 0.
"""

import time
from typing import Any

import torch

from service.spec import ExperimentSpec
from workers import checkpoint
from workers.exchange import build_exchange
from workers.faults import Straggler, chosen_ranks, maybe_kill
from workers.mlflow_log import RunLogger
from workers.model_io import save_final_model
from workers.optim import build_optimizer, optimizer_step
from workers.schedule import build_scheduler
from workers.tasks import build_task
from workers.tasks.base import to_device

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    spec = ExperimentSpec.model_validate(config["spec"])
    train, dist_spec = spec.train, spec.distributed
    assert train is not None and spec.optimizer is not None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logger = RunLogger(config["mlflow_uri"], config["mlflow_run_id"], enabled=rank == 0)
    if rank == 0 and config.get("log_spec", True):
        logger.log_spec(spec.resolved())

    torch.manual_seed(train.seed)  # identical initial weights on every rank
    task = build_task(spec)
    model = task.build_model()
    peft_handle = None
    if spec.peft is not None:
        from workers.peft_hooks import apply_peft

        model, peft_handle = apply_peft(spec, model, task)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    exchange = build_exchange(spec, rank=rank, world=world)
    if dist_spec.strategy == "deepspeed":
        from workers.deepspeed_engine import DeepSpeedModel

        engine = DeepSpeedModel(spec, model, device, peft_handle=peft_handle)
        model, optimizer, scheduler = engine.model, engine.optimizer, engine.scheduler
    else:
        model = model.to(device)
        if exchange is None and world > 1:
            model = ray.train.torch.prepare_model(model, move_to_device=False)
        optimizer = build_optimizer(spec, model, peft_handle)
        scheduler = build_scheduler(optimizer, train)
        engine = None
    if engine is not None:
        start = engine.restore()
    else:
        start = checkpoint.restore(model=model, optimizer=optimizer, scheduler=scheduler)
    restored = start > 0

    byzantine = chosen_ranks(spec.faults.byzantine, world)
    label_flip = (rank in byzantine and spec.faults.byzantine is not None
                  and spec.faults.byzantine.attack.name == "label_flip")
    per_rank = train.batch_size // (world * train.grad_accum)
    batches = task.batches(rank=rank, world=world, batch_size=per_rank, seed=train.seed + 17 * start,
                           label_flip=label_flip)
    straggler = Straggler(spec.faults, rank, world)
    amp = engine.autocast_dtype if engine is not None else _AMP.get(train.precision)
    scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" and engine is None else None
    if rank == 0:
        logger.metrics({"model/params": n_params, "model/trainable_params": n_train}, step=start)
        logger.set_tags({"orchestra.world_size": str(world)})

    eval_every = spec.derived().eval_every
    ckpt_every = spec.derived().checkpoint_every
    window_t, window_steps, window_loss = time.perf_counter(), 0, 0.0
    metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}  # rank 0's latest evaluation, carried by checkpoint reports
    model.train()
    for step in range(start, train.max_steps):
        maybe_kill(spec.faults, rank=rank, step=step, restored=restored)
        if peft_handle is not None:
            peft_handle.on_step_start(step, model)
        micro = [to_device(next(batches), device) for _ in range(train.grad_accum)]

        # called within this iteration only (by the optimizer step below): the loop's values are bound
        def forward_backward(backward: bool = True, micro: list[Any] = micro, step: int = step,
                             metrics: dict[str, float] = metrics) -> torch.Tensor:
            total = torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(micro):
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = task.loss(model, batch) / train.grad_accum
                if backward:
                    if peft_handle is not None and i == 0:
                        peft_handle.before_backward(step, model)
                    no_sync = getattr(model, "no_sync", None)
                    if engine is not None:
                        engine.backward(loss, boundary=i == train.grad_accum - 1)
                    elif no_sync is not None and i < len(micro) - 1:
                        with no_sync():
                            (scaler.scale(loss) if scaler else loss).backward()
                    else:
                        (scaler.scale(loss) if scaler else loss).backward()
                total += loss.detach()
            if backward:
                straggler.delay()
                if peft_handle is not None:
                    peft_handle.after_backward(step, model)
                if exchange is not None:
                    metrics.update(exchange(model, step))
            return total

        loss = optimizer_step(optimizer, forward_backward, model=model, scaler=scaler,
                              grad_clip=train.grad_clip, engine=engine)
        scheduler.step()
        window_loss += float(loss)
        window_steps += 1
        done = step + 1
        if done % train.log_every == 0 or done == train.max_steps:
            elapsed = time.perf_counter() - window_t
            samples_per_s = window_steps * train.batch_size / max(elapsed, 1e-9)
            metrics.update({"train/loss": window_loss / window_steps, "train/lr": float(scheduler.get_last_lr()[0]),
                            "perf/samples_per_s": samples_per_s, "perf/step_time_s": elapsed / window_steps})
            if task.tokens_per_sample:
                metrics["perf/tokens_per_s"] = samples_per_s * task.tokens_per_sample
            if device.type == "cuda":
                metrics["perf/max_mem_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.metrics(metrics, step=done)
            metrics = {}
            window_t, window_steps, window_loss = time.perf_counter(), 0, 0.0
        if done % eval_every == 0 or done == train.max_steps:
            evaluated: dict[str, float] = {}
            if rank == 0 or (engine is not None and engine.eval_on_all_ranks):  # ZeRO-3: a collective
                evaluated = last_eval = task.evaluate(checkpoint.unwrap(model), device, train.eval_batches)
                logger.metrics(evaluated, step=done)
            logger.flush()
            if config.get("report_eval"):  # a sweep trial: Tune's scheduler sees every evaluation
                ray.train.report({"step": done, **evaluated})
        if done % ckpt_every == 0 or done == train.max_steps:
            logger.flush()
            if engine is not None:
                engine.save_and_report(step=done, scheduler=scheduler)
            else:
                checkpoint.save_and_report(model=model, optimizer=optimizer, scheduler=scheduler, step=done,
                                           metrics={"train/loss": float(loss), **last_eval}, rank=rank)
    if engine is not None:
        final = engine.consolidated_model()
    else:
        final = checkpoint.unwrap(model)
    if rank == 0:
        logger.metrics(task.evaluate(final, device, train.eval_batches), step=train.max_steps)
        save_final_model(logger, spec, final, peft_handle)
        logger.flush()
