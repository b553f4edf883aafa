"""The Ray job's entrypoint: ``python -m workers.entrypoint RUN_ID``.

Loads the spec the control plane resolved from the run's MLflow run (validated once here), runs
it, closes the MLflow run.
"""

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from service.spec import SPEC_ARTIFACT, ExperimentSpec
from workers.mlflow_log import RunLogger


def load_spec(mlflow_uri: str, mlflow_run_id: str) -> ExperimentSpec:
    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(tracking_uri=mlflow_uri).download_artifacts(mlflow_run_id, SPEC_ARTIFACT, tmp)
        return ExperimentSpec.model_validate(json.loads(Path(path).read_text()))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m workers.entrypoint RUN_ID", file=sys.stderr)
        return 2
    run_id = argv[1]
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    mlflow_run_id = os.environ.get("ORCHESTRA_MLFLOW_RUN_ID", "")
    spec = load_spec(mlflow_uri, mlflow_run_id)
    storage = os.environ.get("ORCHESTRA_STORAGE_PATH") or os.path.expanduser("~/.orchestra/ray_results")
    logger = RunLogger(mlflow_uri, mlflow_run_id)
    kwargs: dict[str, Any] = {"run_id": run_id, "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id}
    try:
        if spec.task.kind == "merge":
            from workers.merge_job import run_merge

            run_merge(spec, **kwargs)
        elif spec.sweep is not None:
            from workers.sweep import run_sweep

            run_sweep(spec, storage_path=storage, **kwargs)
        elif spec.distributed.strategy == "parameter_server":
            from workers.parameter_server import run_parameter_server

            run_parameter_server(spec, **kwargs)
        else:
            from workers.launch_train import run_trainer

            run_trainer(spec, storage_path=storage, **kwargs)
    except BaseException:
        traceback.print_exc()
        logger.finish("FAILED")
        return 1
    logger.finish("FINISHED")
    print(f"[orchestra] run {run_id} finished; MLflow run {mlflow_run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
