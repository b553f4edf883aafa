"""A sweep: a Ray Tune ``Tuner`` whose trials each run the spec's training as a Ray Train job.

Every trial is the spec with the sampled values set at their paths, validated again, and gets an
MLflow child run of the experiment's run (tag ``mlflow.parentRunId``); the trial's workers log to
it directly, and report their eval metrics to Tune (through Ray Train's ``TuneReportCallback``) so
that ASHA can stop poor trials early. The parent run gets the best trial's values and metric.
"""

import copy
import math
import os
import subprocess
import sys
from typing import Any

from service.spec import ExperimentSpec
from service.spec.derived import processes, worker_resources
from service.spec.sweep import SweepSpec
from service.spec.task import CommandTaskSpec
from workers.mlflow_log import RunLogger
from workers.plan import RunPlan
from workers.settings import settings


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (the spec's sweep paths were checked at validation)."""
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


GROUP_TAG = "orchestra.group"  # what MLflow's UI can group and filter trials by, as the reports do
SEED_PATH = "train.seed"


def group_label(values: dict[str, Any]) -> str:
    """A trial's group: its sampled values but the seed, ``path=value`` joined by ``; `` (a block's
    value as its compact JSON), so that seeds of one configuration share a label."""
    import json

    parts = [f"{path}={json.dumps(v, sort_keys=True, separators=(',', ':')) if isinstance(v, dict | list) else v}"
             for path, v in sorted(values.items()) if path != SEED_PATH]
    return "; ".join(parts)[:5000] or "all"  # MLflow tag values are bounded


def search_space(sweep: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for path, dist in sweep.parameters.items():
        kind, values = next(iter(dist.items()))
        if kind == "uniform":
            space[path] = tune.uniform(values[0], values[1])
        elif kind == "loguniform":
            space[path] = tune.loguniform(values[0], values[1])
        elif kind == "randint":
            space[path] = tune.randint(int(values[0]), int(values[1]))
        elif kind == "choice":
            space[path] = tune.choice(values)
        else:
            space[path] = tune.grid_search(values)
    return space


def trial_spec(base: dict[str, Any], values: dict[str, Any]) -> ExperimentSpec:
    """The trial's spec: a new document (the sampled values set), so validated once, here; the
    trial's workers get it typed."""
    doc = copy.deepcopy(base)
    doc.pop("sweep", None)
    for path, value in values.items():
        set_path(doc, path, value)
    return ExperimentSpec.model_validate(doc)


def report_logged(mlflow_uri: str, mlflow_run_id: str, metric: str) -> None:
    """Report the sweep's metric as the trial logged it to its MLflow run (once, at its end) to Tune."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    metrics = MlflowClient(tracking_uri=mlflow_uri).get_run(mlflow_run_id).data.metrics if mlflow_run_id else {}
    tune.report({"step": 1, **({metric: metrics[metric]} if metric in metrics else {})})


def run_command_trial(task: CommandTaskSpec, *, mlflow_uri: str, mlflow_run_id: str, metric: str) -> None:
    """A command's trial: its script (the trial's values substituted) in the code's folder, logging
    to the trial's MLflow run; the sweep's metric, read back from that run, goes to Tune."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # `python` is this one
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_RUN_ID": mlflow_run_id, "PATH": path}
    workdir = os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd()  # Tune moves trials to a folder of theirs
    done = subprocess.run(["bash", "-c", task.rendered()], cwd=workdir, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the command exited with {done.returncode}: {task.rendered()[:300]}")
    report_logged(mlflow_uri, mlflow_run_id, metric)


def runs_in_trial(spec: ExperimentSpec) -> bool:
    """Whether the trial's own process does the work: a merge, or workers simulated in process (a
    command runs in the trial too, as its script); the other trials start a Ray Train run."""
    return spec.task.kind == "merge" or spec.distributed.placement == "in_process"


def run_in_trial(spec: ExperimentSpec, *, run_id: str, mlflow_uri: str, mlflow_run_id: str, metric: str) -> None:
    """A merge's or a parameter server's trial, in the trial's process; its metric (read back from
    its MLflow run) goes to Tune once, at the end, so ASHA cannot stop it early."""
    if spec.task.kind == "merge":
        from workers.merge_job import run_merge

        run_merge(spec, run_id=run_id, mlflow_uri=mlflow_uri, mlflow_run_id=mlflow_run_id)
    else:
        from workers.parameter_server import run_parameter_server

        run_parameter_server(spec, run_id=run_id, mlflow_uri=mlflow_uri, mlflow_run_id=mlflow_run_id)
    report_logged(mlflow_uri, mlflow_run_id, metric)


def concurrent_trials(spec: ExperimentSpec, cluster_cpus: float, cluster_gpus: float) -> int:
    """Trials that fit at once: each holds its workers (and a little for the trial's own actor)."""
    dist, sweep = spec.distributed, spec.sweep
    assert sweep is not None
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    per_worker, workers = worker_resources(dist), processes(dist)
    if runs_in_trial(spec):  # the trial's own process is all it runs
        fits = [math.floor(cluster_cpus / max(per_worker.get("CPU", 1.0), 1e-9))]
    else:  # the trial's actor and its Ray Train workers
        fits = [math.floor(cluster_cpus / max(per_worker.get("CPU", 1.0) * workers + 0.5, 1e-9))]
    if dist.use_gpu:
        fits.append(math.floor(cluster_gpus / max(per_worker.get("GPU", 1.0) * workers, 1e-9)))
    return max(1, min(fits))


def submitted_spec(mlflow_uri: str, mlflow_run_id: str) -> dict[str, Any] | None:
    """The spec as the user submitted it (the control plane stores it beside the resolved one for
    sweeps), or None when the run has none."""
    import json
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from service.spec import SUBMITTED_ARTIFACT

    if not (mlflow_uri and mlflow_run_id):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient(tracking_uri=mlflow_uri).download_artifacts(mlflow_run_id, SUBMITTED_ARTIFACT, tmp)
        except Exception:  # an older run: only the resolved spec
            return None
        doc = json.loads(Path(path).read_text())
    return doc if isinstance(doc, dict) else None


def run_sweep(spec: ExperimentSpec, *, run_id: str, mlflow_uri: str, mlflow_run_id: str,
              storage_path: str) -> dict[str, Any]:
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from workers.launch_train import run_trainer

    sweep = spec.sweep
    assert sweep is not None
    max_steps = spec.train.max_steps if spec.train is not None else 1
    # trials start from the submitted spec: values derived from a swept field (the evaluation period
    # from train.max_steps, ...) are derived again for each trial, not copied from the base run
    base = submitted_spec(mlflow_uri, mlflow_run_id) or spec.resolved()
    parent = RunLogger(mlflow_uri, mlflow_run_id)
    parent.log_spec(spec.resolved())
    client = MlflowClient(tracking_uri=mlflow_uri) if mlflow_uri and mlflow_run_id else None
    experiment_id = client.get_run(mlflow_run_id).info.experiment_id if client else ""

    def trial(config: dict[str, Any]) -> None:
        values = {k: config[k] for k in sweep.parameters}
        tspec = trial_spec(base, values)
        child_id = ""
        if client is not None:
            ctx = tune.get_context()
            child = client.create_run(experiment_id, run_name=f"{spec.name}-{ctx.get_trial_name()}",
                                      tags={"mlflow.parentRunId": mlflow_run_id, "orchestra.run_id": run_id,
                                            "orchestra.trial": ctx.get_trial_id(),
                                            GROUP_TAG: group_label(values)})
            child_id = child.info.run_id
            for path, value in values.items():
                client.log_param(child_id, f"sweep.{path}", value)
        status = "FAILED"
        try:
            if isinstance(tspec.task, CommandTaskSpec):
                run_command_trial(tspec.task, mlflow_uri=mlflow_uri, mlflow_run_id=child_id, metric=sweep.metric)
            elif runs_in_trial(tspec):
                run_in_trial(tspec, run_id=f"{run_id}-{tune.get_context().get_trial_id()}", mlflow_uri=mlflow_uri,
                             mlflow_run_id=child_id, metric=sweep.metric)
            else:
                run_trainer(tspec, run_id=f"{run_id}-{tune.get_context().get_trial_id()}", mlflow_uri=mlflow_uri,
                            mlflow_run_id=child_id, storage_path=storage_path, callbacks=[TuneReportCallback()],
                            report_eval=True)
            status = "FINISHED"
        finally:
            if client is not None and child_id:
                client.set_terminated(child_id, status=status)

    scheduler: Any = FIFOScheduler()
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=max_steps,
                                  grace_period=max(1, RunPlan.from_spec(spec).cadence.eval_every if spec.train else 1))
    # Checkpoint reports carry the training loss but not the sweep's eval metric: Tune must accept
    # results without it (the schedulers skip such results).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    if not resources:
        ray.init(address=settings().ray_address, ignore_reinit_error=True)
        resources = ray.cluster_resources()
    trainable: Any = trial
    if isinstance(spec.task, CommandTaskSpec) or runs_in_trial(spec):  # the trial's process holds the resources
        held = worker_resources(spec.distributed)
        trainable = tune.with_resources(trial, {"cpu": held.get("CPU", 1.0), "gpu": held.get("GPU", 0.0)})
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                    scheduler=scheduler,
                                    max_concurrent_trials=concurrent_trials(spec, resources.get("CPU", 1.0),
                                                                            resources.get("GPU", 0.0))),
        run_config=tune.RunConfig(name=f"orchestra-{run_id}-sweep", storage_path=storage_path),
    )
    results = tuner.fit()
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="last")
    trials = [results[i] for i in range(len(results))]
    errors = [r for r in trials if r.error is not None]
    summary = {"sweep/trials": float(len(trials)), "sweep/failed_trials": float(len(errors))}
    if best is not None and best.config and best.metrics and sweep.metric in best.metrics:
        summary[f"sweep/best/{sweep.metric}"] = float(best.metrics[sweep.metric])
        if client is not None:
            for path in sweep.parameters:
                client.log_param(mlflow_run_id, f"sweep.best.{path}", best.config[path])
    parent.metrics(summary, step=max_steps)
    parent.flush()
    if len(errors) == len(trials):
        raise RuntimeError(f"every trial of the sweep failed; first error: {errors[0].error}")
    return summary
