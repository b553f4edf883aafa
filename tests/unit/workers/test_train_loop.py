"""The real Ray Train loop (``workers.train_loop.train_worker``) in one process, Ray and MLflow
faked (``harness.py``): its weights against a plain torch loop written here from the task API,
its metrics and cadence, and a restart from its own checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service.spec import ExperimentSpec
from service.spec.faults import FaultsSpec
from tests.unit.workers.harness import final_state, run_worker
from workers.tasks import build_task

torch.set_num_threads(1)


def mlp_spec(steps: int = 5, **train: Any) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "loop-unit",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [16]}},
        "train": {"max_steps": steps, "batch_size": 16, "grad_accum": 2, "seed": 5, "grad_clip": 0.2,
                  "log_every": 2, "eval_every": 2, "eval_batches": 2, **train},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "distributed": {"num_workers": 1, "strategy": "ddp"},
    })


def reference(spec: ExperimentSpec, restarts: list[int], norms: list[float] | None = None) -> dict[str, torch.Tensor]:
    """SGD with momentum, 2 micro-batches per step, clipping; the batch stream starts again at each
    step of ``restarts`` with seed ``seed + 17 * step``, as after a restore from that step."""
    train = spec.train
    assert train is not None
    task = build_task(spec)
    torch.manual_seed(train.seed)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = task.batches(rank=0, world=1, batch_size=8, seed=train.seed)
    for step in range(train.max_steps):
        if step in restarts:
            batches = task.batches(rank=0, world=1, batch_size=8, seed=train.seed + 17 * step)
        opt.zero_grad()
        for _ in range(2):
            (task.loss(model, next(batches)) / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
        if norms is not None:
            norms.append(float(norm))
        opt.step()
    return model.state_dict()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_loop_trains_like_plain_torch_and_logs_on_its_cadence(tmp_path: Path) -> None:
    spec = mlp_spec(steps=5)
    log, fake = run_worker(spec, tmp_path)
    norms: list[float] = []
    assert_same(final_state(tmp_path), reference(spec, restarts=[], norms=norms))
    assert min(norms) > 0.2  # clipping was active on every step
    assert log.steps("model/params") == [0]
    for key in ("train/loss", "train/lr", "perf/samples_per_s", "perf/step_time_s"):
        assert log.steps(key) == [2, 4, 5], key
    assert "perf/tokens_per_s" not in log.metric_log  # images have no tokens
    assert not any(k.startswith("exchange/") for k in log.metric_log)  # the plain mean: no exchange
    assert log.steps("eval/accuracy") == [2, 4, 5, 5]  # the cadence, then the final model
    assert [r["step"] for r in fake.reports] == [5]  # one checkpoint, at the end
    assert set(fake.reports[0]) == {"step", "train/loss", "eval/loss", "eval/accuracy"}
    assert (tmp_path / "checkpoints" / "step5" / "state.pt").exists()


def test_the_check_can_fail(tmp_path: Path) -> None:
    spec = mlp_spec(steps=3)
    run_worker(spec, tmp_path)
    with pytest.raises(AssertionError):  # without clipping
        assert_same(final_state(tmp_path), reference(mlp_spec(steps=3, grad_clip=None), restarts=[]))
    with pytest.raises(AssertionError):  # a batch stream restarted where none was
        assert_same(final_state(tmp_path), reference(spec, restarts=[1]))


def test_restart_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """A first attempt checkpoints at steps 2 and 4; a second attempt restored from step 2 (what
    Ray Train hands a restarted worker) continues with the saved weights, momentum and step."""
    spec = mlp_spec(steps=4, checkpoint_every=2, log_every=1)
    _, first = run_worker(spec, tmp_path / "first")
    assert [r["step"] for r in first.reports] == [2, 4]
    log, _ = run_worker(spec, tmp_path / "second", restore_from=tmp_path / "first" / "checkpoints" / "step2")
    assert log.steps("model/params") == [2]  # logged at the step it starts from
    assert log.steps("train/loss") == [3, 4]
    assert_same(final_state(tmp_path / "second"), reference(spec, restarts=[2]))


def test_sweep_trial_reports_every_evaluation(tmp_path: Path) -> None:
    _, fake = run_worker(mlp_spec(steps=4, eval_every=2), tmp_path, report_eval=True)
    evals = [r for r in fake.reports if "train/loss" not in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("eval/accuracy" in r for r in evals)


def test_kill_fires_once_at_its_step_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import faults, settings

    slept: list[float] = []
    monkeypatch.setattr(settings, "settings", lambda: settings.WorkerSettings(kill_grace_s=0.25))
    monkeypatch.setattr(faults.time, "sleep", slept.append)

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(faults.os, "_exit", exit_)
    kill = FaultsSpec.model_validate({"kill": {"rank": 1, "step": 3}})
    faults.maybe_kill(kill, rank=1, step=2, restored=False)
    faults.maybe_kill(kill, rank=0, step=3, restored=False)
    faults.maybe_kill(kill, rank=1, step=3, restored=True)  # the restarted attempt goes on
    assert slept == []
    with pytest.raises(SystemExit, match="17"):
        faults.maybe_kill(kill, rank=1, step=3, restored=False)
    assert slept == [0.25]
