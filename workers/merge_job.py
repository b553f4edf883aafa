"""A ``task.kind: merge`` run: load the inputs, merge them, evaluate, log to MLflow.

Inputs (and ``merge.base``) are given as
- an Orchestra run id (the control plane's; its MLflow run carries the tag ``orchestra.run_id``),
- an MLflow run id,
- an MLflow artifact or model URI (``runs:/<id>/model``, ``models:/<name>/<version>``), or
- a local folder (a model folder as ``workers.model_io.save_final_model`` writes it, or a run's
  downloaded artifact root holding ``model/``).
A finished run's model folder has ``state_dict.pt`` and ``spec.json`` (the spec that rebuilds it)
and, for a PEFT run, ``adapter/`` (peft format): such an input is loaded as a peft model on its
rebuilt base, and the mergers merge its adapter deltas; ``merge.base: adapters`` then takes the
shared frozen base as the base of task arithmetic, TIES and aTLAS.

The merged model and every input are evaluated on ``task.dataset`` (the inputs' task with the
merge spec's dataset), and so is their ensemble (mean of the outputs); the merged model is logged
as ``model/`` with a ``spec.json`` that rebuilds it (the first input's spec, with the dataset of the
merge and the merged widths), so a merged model can itself be an input of a later merge.
"""

import json
import logging
import os
import re
import tempfile
import time
from typing import Any

import torch
from torch import nn

from algorithms.merging.adapters import fold_adapter, is_adapter_model
from algorithms.merging.base import MergeContext
from algorithms.merging.config import ADAPTER_BASE, MergeBase, MergeData
from algorithms.merging.registry import MERGERS
from service.spec import ExperimentSpec
from service.spec.task import BuiltinTaskSpec
from workers.mlflow_log import RunLogger
from workers.model_io import save_final_model
from workers.tasks import build_task
from workers.tasks.base import Task, to_device

log = logging.getLogger(__name__)

RUN_TAG = "orchestra.run_id"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


# ---- inputs ------------------------------------------------------------------------------------


def resolve_folder(ref: str, tracking_uri: str, dest: str) -> str:
    """A local model folder (with spec.json) for one input reference."""
    if os.path.exists(ref):
        return _model_folder(ref, ref)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts

    if "://" in ref or ref.startswith(("runs:/", "models:/")):
        path = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=dest, tracking_uri=tracking_uri or None)
        return _model_folder(path, ref)
    run_id = mlflow_run_for(ref, tracking_uri)
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="model", dst_path=dest, tracking_uri=tracking_uri or None
    )
    return _model_folder(path, ref)


def mlflow_run_for(ref: str, tracking_uri: str) -> str:
    """The MLflow run id of an Orchestra run id (by tag) or of an MLflow run id; it must be finished."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not _ID.match(ref):
        raise ValueError(f"merge input {ref!r}: not a path, a URI or a run id")
    client = MlflowClient(tracking_uri=tracking_uri or None)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL, max_results=50_000)]
    found = client.search_runs(experiments, filter_string=f"tags.`{RUN_TAG}` = '{ref}'", max_results=2)
    if found:
        run = found[0]
    else:
        try:
            run = client.get_run(ref)
        except MlflowException:
            raise ValueError(f"merge input {ref!r}: no Orchestra or MLflow run with this id") from None
    if run.info.status != "FINISHED":
        raise ValueError(f"merge input {ref!r}: its run is {run.info.status}, not FINISHED")
    return str(run.info.run_id)


def _model_folder(path: str, ref: str) -> str:
    for folder in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(folder, "spec.json")) and os.path.isfile(os.path.join(folder, "state_dict.pt")):
            return folder
    raise ValueError(f"merge input {ref!r}: {path} holds no model (spec.json and state_dict.pt)")


def load_model(folder: str) -> tuple[nn.Module, ExperimentSpec]:
    """The model saved in ``folder`` and the spec that built it.

    ``state_dict.pt`` always holds the plain architecture (a PEFT run's adapter merged in). When
    the folder also has a peft adapter (``adapter/adapter_config.json``), the model is returned as
    a peft model on its rebuilt base instead (the base the run started from: the same seed, task
    and model), so that the mergers merge the adapter deltas and know the shared base; if that
    does not reproduce the saved weights (a method that also changed the base), the plain model
    is used."""
    with open(os.path.join(folder, "spec.json")) as fh:
        spec = ExperimentSpec.model_validate(json.load(fh))
    model = build_task(spec).build_model()
    state = torch.load(os.path.join(folder, "state_dict.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    adapter = os.path.join(folder, "adapter")
    if spec.peft is not None and os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        adapted = _adapter_model(spec, adapter)
        if adapted is not None and _same_weights(fold_adapter(adapted), state):
            return adapted, spec
        log.warning("%s: the adapter does not reproduce the saved model; merging full weights", folder)
    return model, spec


def _adapter_model(spec: ExperimentSpec, adapter: str) -> nn.Module | None:
    from peft import PeftModel

    if spec.train is not None:
        torch.manual_seed(spec.train.seed)  # as the training loop did before building the model
    base = build_task(spec).build_model()
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("adapter %s not loaded: %s", adapter, exc)
        return None
    model.eval()
    return model


def _same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    if own.keys() != state.keys():
        return False
    return all(torch.allclose(own[k].float(), v.float(), rtol=1e-4, atol=1e-5) for k, v in state.items())


# ---- specs of the evaluation and of the merged model --------------------------------------------


def eval_spec(merge_spec: ExperimentSpec, source: ExperimentSpec) -> ExperimentSpec:
    """The input's training spec with the merge's dataset: what evaluates the models."""
    raw = source.resolved()
    assert isinstance(merge_spec.task, BuiltinTaskSpec)
    raw["task"]["dataset"] = merge_spec.task.dataset.model_dump(mode="json")
    try:
        return ExperimentSpec.model_validate(raw)
    except ValueError as exc:
        raise ValueError(f"task.dataset: does not fit the inputs' task ({source.task.kind}): {exc}") from None


def merged_spec(spec: ExperimentSpec, merged: nn.Module) -> ExperimentSpec:
    """``spec`` with the merged model's widths (PLeaS may change them) and no PEFT section."""
    raw = spec.resolved()
    raw["peft"] = None
    model = raw["task"]["model"]
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    if model["name"] == "mlp":
        model["hidden"] = [lin.out_features for lin in linears[:-1]]
    elif model["name"] == "cnn":
        model["channels"] = [c.out_channels for c in convs]
        model["hidden"] = linears[0].out_features
    elif model["name"] in ("llama", "gpt2"):
        cfg = getattr(merged, "config", None)
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
        if inter is not None:
            model["intermediate"] = int(inter)
    return ExperimentSpec.model_validate(raw)


def check_rebuilds(spec: ExperimentSpec, merged: nn.Module) -> None:
    """The saved spec must rebuild a model that takes the merged weights."""
    rebuilt = build_task(spec).build_model()
    rebuilt.load_state_dict(merged.state_dict())


# ---- evaluation -----------------------------------------------------------------------------------


class Ensemble(nn.Module):
    """The mean of the members' outputs (logits), the function PLeaS approximates."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outs = [m(*args, **kwargs) for m in self.members]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs).mean(0)
        logits = torch.stack([o.logits for o in outs]).mean(0)
        first = outs[0]
        first.logits = logits
        return first


def draw_data(task: Task, data: MergeData) -> list[Any]:
    it = task.batches(rank=0, world=1, batch_size=data.batch_size, seed=data.seed)
    return [next(it) for _ in range(data.batches)]


def merge_data(cfg: MergeBase, task: Task, device: torch.device) -> list[Any] | None:
    """Batches for the merger: drawn when the spec gives ``merge.data`` or the method needs data."""
    if cfg.data is None and not cfg.needs_data():
        return None
    return [to_device(b, device) for b in draw_data(task, cfg.data or MergeData())]


def merge_context(cfg: MergeBase, task: Task, data: list[Any] | None) -> MergeContext:
    """What the method's config says it needs from the task, and nothing else."""
    shape = None
    if data is None and cfg.needs_example_shape():
        probe = next(task.batches(rank=0, world=1, batch_size=1, seed=0))
        shape = list(probe[0].shape[1:])
    return MergeContext(loss_fn=task.loss if cfg.needs_loss() else None, example_shape=shape)


def device_for(spec: ExperimentSpec) -> torch.device:
    return torch.device("cuda" if spec.distributed.use_gpu and torch.cuda.is_available() else "cpu")


# ---- the job --------------------------------------------------------------------------------------


def run_merge(spec: ExperimentSpec, *, run_id: str, mlflow_uri: str, mlflow_run_id: str) -> dict[str, float]:
    cfg = spec.merge
    assert cfg is not None, "task.kind merge needs a merge section"
    logger = RunLogger(mlflow_uri, mlflow_run_id)
    logger.log_spec(spec.resolved())
    device = device_for(spec)
    with tempfile.TemporaryDirectory() as tmp:
        own_base = cfg.base is not None and cfg.base != ADAPTER_BASE
        refs = list(cfg.inputs) + ([cfg.base] if own_base and cfg.base else [])
        loaded = []
        for i, ref in enumerate(refs):
            folder = resolve_folder(ref, mlflow_uri, os.path.join(tmp, str(i)))
            loaded.append(load_model(folder))
            log.info("merge input %d: %s (%s)", i, ref, getattr(loaded[-1][1].task, "model", None))
    models = [m.to(device) for m, _ in loaded[: len(cfg.inputs)]]
    base = loaded[-1][0].to(device) if own_base else None
    if cfg.base == ADAPTER_BASE:
        plain = [i for i, m in enumerate(models) if not is_adapter_model(m)]
        if plain:
            raise ValueError(f"merge.base: {ADAPTER_BASE!r} needs PEFT adapter runs; input {plain[0]} is not one")
    spec_eval = eval_spec(spec, loaded[0][1])
    task = build_task(spec_eval)
    max_batches = spec_eval.train.eval_batches if spec_eval.train is not None else 8

    data = merge_data(cfg, task, device)
    merger = MERGERS.build(cfg, merge_context(cfg, task, data))
    t0 = time.perf_counter()
    merged = merger.merge(models, base=base, data=data)
    seconds = time.perf_counter() - t0
    merged.eval()

    metrics: dict[str, float] = {"merge/seconds": seconds,
                                 "model/params": float(sum(p.numel() for p in merged.parameters()))}
    metrics.update(task.evaluate(merged, device, max_batches))
    for i, m in enumerate(models):
        metrics.update({f"inputs/{i}/{k}": v for k, v in task.evaluate(m, device, max_batches).items()})
        metrics[f"inputs/{i}/model/params"] = float(sum(p.numel() for p in m.parameters()))
    try:
        metrics.update({f"ensemble/{k}": v for k, v in task.evaluate(Ensemble(models), device, max_batches).items()})
    except (AttributeError, TypeError, RuntimeError) as exc:  # outputs that are not logits
        log.warning("ensemble not evaluated: %s", exc)
    for k, v in sorted(metrics.items()):
        log.info("%s = %.6g", k, v)
    logger.metrics(metrics, step=0)
    logger.set_tags({"orchestra.merge.method": cfg.method, "orchestra.merge.inputs": json.dumps(list(cfg.inputs))})
    logger.flush(wait=True)

    out_spec = merged_spec(spec_eval, merged)
    merged = merged.cpu()
    check_rebuilds(out_spec, merged)
    save_final_model(logger, out_spec, merged)
    return metrics
