"""Run the spec's training as a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL on GPU)."""

from typing import Any

from service.spec import ExperimentSpec


def scaling_config(spec: ExperimentSpec) -> Any:
    from ray.train import ScalingConfig

    dist = spec.distributed
    return ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                         resources_per_worker=spec.derived().resources_per_worker)


def run_trainer(spec: ExperimentSpec, *, run_id: str, mlflow_uri: str, mlflow_run_id: str,
                storage_path: str, log_spec: bool = True, callbacks: list[Any] | None = None,
                report_eval: bool = False) -> dict[str, Any]:
    """Train; ``report_eval`` also reports each evaluation to Ray (for a sweep's Tune scheduler)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_loop import train_worker

    dist = spec.distributed
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.resolved(), "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
                           "log_spec": log_spec, "report_eval": report_eval},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=scaling_config(spec),
        run_config=RunConfig(
            name=f"orchestra-{run_id}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
