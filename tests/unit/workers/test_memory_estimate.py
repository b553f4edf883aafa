"""The DeepSpeed strategy's memory estimate, which turns activation checkpointing on only when
a model would not fit (no engine runs: the GPU's free memory is faked)."""

from typing import Any

import pytest

from tests.unit.test_deepspeed_config import ds_spec, parse


def test_memory_estimate_turns_activation_checkpointing_on_only_when_needed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    from workers.plan import RunPlan
    from workers.strategy.deepspeed import memory_estimate
    from workers.tasks import build_task

    def estimate(spec: Any, device: Any) -> Any:
        return memory_estimate(spec, RunPlan.from_spec(spec).zero_stage, model, device)

    free = 10 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    gpu = torch.device("cuda", 0)
    doc = ds_spec(stage=0, workers=2, batch=16, accum=1)  # micro-batch 8, seq 64, hidden 64, 2 layers
    model = build_task(parse(doc)).build_model()
    n = sum(p.numel() for p in model.parameters())
    activations = 34 * 64 * 8 * 64 * 2 + 6 * 64 * 8 * 256
    expected = {0: 16 * n, 1: 4 * n + 12 * n / 2, 2: 2 * n + 14 * n / 2, 3: 16 * n / 2}
    for stage, states in expected.items():
        doc["distributed"]["deepspeed"]["zero_stage"] = stage
        need, have = estimate(parse(doc), gpu)
        assert need == pytest.approx(states + activations) and have == free
    doc["distributed"]["deepspeed"].update(zero_stage=3, offload_optimizer=True, offload_params=True)
    need, _ = estimate(parse(doc), gpu)
    assert need == pytest.approx(2 * n / 2 + activations)  # only the bf16 gradient shard stays on the GPU
    assert estimate(parse(doc), torch.device("cpu")) is None
