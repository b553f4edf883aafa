"""Every registered optimizer, from its default config: it builds, takes a step on a tiny model
that lowers the loss, and its torch class agrees with what its config declares."""

import pytest
import torch

from algorithms.optimizers import config as C
from algorithms.optimizers.registry import OPTIMIZERS


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("config_cls", list(OPTIMIZERS), ids=lambda c: c.__name__)
def test_builds_from_defaults_and_steps(config_cls: type[C.OptimizerBase]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    cfg = OPTIMIZERS.config(config_cls.model_fields["name"].annotation.__args__[0], lr=0.01)
    opt = OPTIMIZERS.build(cfg, model.parameters())
    assert bool(getattr(opt, "needs_closure", False)) == cfg.NEEDS_CLOSURE
    before = [p.detach().clone() for p in model.parameters()]
    start = float(_loss(model, x, y))

    def forward_backward(backward: bool = True) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        if backward:
            loss.backward()
        return loss.detach()

    for _ in range(5):
        if cfg.NEEDS_CLOSURE:
            opt.step(forward_backward)
        else:
            forward_backward()
            opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(_loss(model, x, y)) < start


def test_a_name_registered_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer 'sgd' is already registered"):
        OPTIMIZERS.register(C.SGDConfig, lambda cfg, params: torch.optim.SGD(params, lr=cfg.lr))
