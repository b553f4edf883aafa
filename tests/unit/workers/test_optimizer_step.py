"""The worker loop's optimizer_step with closure-based optimizers."""

from __future__ import annotations

import pytest
import torch

from algorithms.optimizers.registry import OPTIMIZERS, build
from tests.unit.optimizers.helpers import CountingClosure, TwoLayer, batches
from workers.optim import optimizer_step


@pytest.mark.parametrize("name", ["lorenza", "adazo_sam", "sam"])
def test_closure_optimizers_get_the_loop_closure_and_clipping(name: str) -> None:
    model = TwoLayer()
    opt = build(name, model.parameters(), lr=1e-2, **({"rank": 4} if name == "lorenza" else {}))
    for batch in batches(2):
        closure = CountingClosure(model, list(model.parameters()), batch)
        loss = optimizer_step(opt, closure, model=model, scaler=None, grad_clip=1e-3)
        assert torch.isfinite(loss)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))  # type: ignore[union-attr]
        assert float(norm) <= 1e-3 * (1 + 1e-5)  # the gradient the update used was clipped
    # fp16 loss scaling is refused when the spec is validated (the config says so), not in the loop
    cfg = OPTIMIZERS.config(name, lr=1e-2)
    with pytest.raises(ValueError, match="bf16"):
        cfg.check_distributed("ddp", None, "fp16")
