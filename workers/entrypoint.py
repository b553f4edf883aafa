"""The Ray job's entrypoint: ``python -m workers.entrypoint RUN_ID``.

Reads the worker settings from the environment, loads the spec the control plane resolved from
the run's MLflow run (validated once, here: everything below gets the typed spec), runs it, closes
the MLflow run.
"""

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from service.spec import SPEC_ARTIFACT, ExperimentSpec
from workers import watchdog
from workers.mlflow_log import RunLogger
from workers.settings import WorkerSettings, settings, setup_logging

log = logging.getLogger("workers.entrypoint")  # not __name__: run as __main__ (python -m)


def load_spec(mlflow_uri: str, mlflow_run_id: str) -> ExperimentSpec:
    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(tracking_uri=mlflow_uri).download_artifacts(mlflow_run_id, SPEC_ARTIFACT, tmp)
        return ExperimentSpec.model_validate(json.loads(Path(path).read_text()))


def run(spec: ExperimentSpec, run_id: str, env: WorkerSettings) -> None:
    """The spec's job: a sweep, a merge, a parameter-server run or a Ray Train run."""
    kwargs: dict[str, Any] = {"run_id": run_id, "mlflow_uri": env.mlflow_uri, "mlflow_run_id": env.mlflow_run_id}
    if spec.sweep is not None:
        from workers.sweep import run_sweep

        run_sweep(spec, storage_path=env.storage_path, **kwargs)
    elif spec.task.kind == "merge":
        from workers.merge_job import run_merge

        run_merge(spec, **kwargs)
    elif spec.distributed.strategy == "parameter_server":
        from workers.parameter_server import run_parameter_server

        run_parameter_server(spec, **kwargs)
    else:
        from workers.launch_train import run_trainer

        run_trainer(spec, storage_path=env.storage_path, **kwargs)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m workers.entrypoint RUN_ID\n")
        return 2
    setup_logging()
    run_id, env = argv[1], settings()
    watchdog.watch(env.ray_address, env.ray_lost_exit_s)
    spec = load_spec(env.mlflow_uri, env.mlflow_run_id)
    logger = RunLogger(env.mlflow_uri, env.mlflow_run_id)
    try:
        run(spec, run_id, env)
    except BaseException:
        log.exception("run %s failed", run_id)
        logger.finish("FAILED")
        return 1
    logger.finish("FINISHED")
    log.info("run %s finished; MLflow run %s", run_id, env.mlflow_run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
