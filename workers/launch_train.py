"""Run the spec's training as a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL on GPU)."""

import logging
from typing import Any

from service.spec import ExperimentSpec
from workers.mlflow_log import RunLogger
from workers.plan import RunPlan

log = logging.getLogger(__name__)


def scaling_config(spec: ExperimentSpec) -> Any:
    from ray.train import ScalingConfig

    dist = spec.distributed
    return ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                         resources_per_worker=RunPlan.from_spec(spec).resources_per_worker)


def run_trainer(spec: ExperimentSpec, *, run_id: str, mlflow_uri: str, mlflow_run_id: str,
                storage_path: str, log_spec: bool = True, callbacks: list[Any] | None = None,
                report_eval: bool = False) -> dict[str, Any]:
    """Train; ``report_eval`` also reports each evaluation to Ray (for a sweep's Tune scheduler).
    The workers get the typed spec (it pickles): validated once, by whoever parsed it."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_loop import train_worker

    dist = spec.distributed
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
                           "log_spec": log_spec, "report_eval": report_eval},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=scaling_config(spec),
        run_config=RunConfig(
            name=f"orchestra-{run_id}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=checkpoint_config(spec),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if log_spec and spec.checkpoints is not None and spec.checkpoints.log_to_mlflow:  # the run, not a sweep's trial
        register_checkpoints(result, spec, RunLogger(mlflow_uri, mlflow_run_id))
    return dict(result.metrics or {})


def checkpoint_config(spec: ExperimentSpec) -> Any:
    """Ray Train's retention: the spec's ``checkpoints`` (Ray keeps the latest besides the best)."""
    from ray.train import CheckpointConfig

    ckpt = spec.checkpoints
    if ckpt is None:
        return CheckpointConfig(num_to_keep=2)
    if ckpt.keep_best:
        return CheckpointConfig(num_to_keep=ckpt.keep_best, checkpoint_score_attribute=ckpt.metric,
                                checkpoint_score_order=ckpt.mode)
    return CheckpointConfig(num_to_keep=ckpt.latest)


def register_checkpoints(result: Any, spec: ExperimentSpec, logger: RunLogger) -> None:
    """Upload the run's last checkpoint (and its best, when ranked) to its MLflow run, with the
    step and metric of each as tags (``checkpoint.last.step``, ``checkpoint.best.eval/loss``, ...)."""
    ckpt = spec.checkpoints
    assert ckpt is not None
    chosen: dict[str, tuple[Any, dict[str, Any]]] = {}
    if result.checkpoint is not None:
        last_metrics: dict[str, Any] = next(
            (m for c, m in result.best_checkpoints or [] if c.path == result.checkpoint.path), {})
        chosen["last"] = (result.checkpoint, last_metrics)
    if ckpt.keep_best and result.best_checkpoints:
        scored = [(c, m) for c, m in result.best_checkpoints if ckpt.metric in m]
        if scored:
            pick = min if ckpt.mode == "min" else max
            chosen["best"] = pick(scored, key=lambda cm: float(cm[1][ckpt.metric]))
    for name, (checkpoint, metrics) in chosen.items():
        with checkpoint.as_directory() as folder:
            logger.artifacts(folder, f"checkpoints/{name}")
        tags = {f"checkpoint.{name}.{k}": str(v) for k, v in metrics.items() if k == "step" or k == ckpt.metric}
        tags[f"checkpoint.{name}.path"] = f"checkpoints/{name}"
        logger.set_tags(tags)
    log.info("registered checkpoints %s on MLflow run %s", sorted(chosen), logger.run_id)
