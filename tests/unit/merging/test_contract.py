"""Every registered merger, from its default config and only what that config says it needs: a
merge of identical models (with that model as the base where a base is needed) is that model, the
inputs are left untouched, and what a config declares it needs is really needed (the merge refuses
to run without it). A new method is covered by registering it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.merging import config as C
from algorithms.merging.base import MergeContext, Merger
from algorithms.merging.registry import MERGERS
from algorithms.registry import discriminator_value

from ._models import assert_same_state, digits_mlp, state_of

EXAMPLE_SHAPE = [64]  # one digits example, flattened: what the digits MLP takes


def _default_config(config_cls: type[C.MergeBase], n_inputs: int = 2) -> C.MergeBase:
    fields: dict[str, object] = {"inputs": [f"run-{i}" for i in range(n_inputs)]}
    if config_cls.NEEDS_BASE:
        fields["base"] = "run-base"
    return MERGERS.config(discriminator_value(config_cls, "method"), **fields)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _needs(cfg: C.MergeBase) -> tuple[MergeContext, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The context and data the merge job would supply for ``cfg`` (and nothing it does not ask for)."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(200, 64, generator=gen), torch.randint(0, 10, (200,), generator=gen))]
    context = MergeContext(loss_fn=_loss if cfg.needs_loss() else None,
                           example_shape=EXAMPLE_SHAPE if cfg.needs_example_shape() else None)
    return context, data if cfg.needs_data() else None


@pytest.mark.parametrize("config_cls", list(MERGERS), ids=lambda c: c.__name__)
def test_identical_models_merge_to_that_model(config_cls: type[C.MergeBase]) -> None:
    cfg = _default_config(config_cls)
    context, data = _needs(cfg)
    merger = MERGERS.build(cfg, context)
    assert isinstance(merger, Merger)
    torch.manual_seed(0)
    model = digits_mlp()
    copies = [model, copy.deepcopy(model)]
    # the base, where one is needed, is the model too: every method's defaults must then return it
    # (with another base, e.g. task arithmetic's default scaling 1 rightly sums the task vectors)
    base = copy.deepcopy(model) if cfg.NEEDS_BASE else None
    before = [state_of(m) for m in copies]

    merged = merger.merge(copies, base=base, data=data)

    assert merged is not model
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-3, rtol=1e-3)
    for m, s in zip(copies, before, strict=True):
        assert_same_state(state_of(m), s)


@pytest.mark.parametrize("config_cls", [c for c in MERGERS if c.NEEDS_BASE], ids=lambda c: c.__name__)
def test_a_declared_base_is_needed(config_cls: type[C.MergeBase]) -> None:
    cfg = _default_config(config_cls)
    context, data = _needs(cfg)
    with pytest.raises(ValueError, match="base"):
        MERGERS.build(cfg, context).merge([digits_mlp(), digits_mlp()], base=None, data=data)


@pytest.mark.parametrize("config_cls", [c for c in MERGERS if _default_config(c).needs_data()],
                         ids=lambda c: c.__name__)
def test_declared_data_is_needed(config_cls: type[C.MergeBase]) -> None:
    cfg = _default_config(config_cls)
    context, _ = _needs(cfg)
    with pytest.raises(ValueError, match="needs data"):
        MERGERS.build(cfg, context).merge([digits_mlp(), digits_mlp()], base=digits_mlp(), data=None)


def test_every_spec_method_is_registered() -> None:
    """The spec's union of merge sections and the registry name the same methods."""
    from typing import get_args

    union = get_args(C.MergeConfig)[0]
    assert {discriminator_value(c, "method") for c in get_args(union)} == set(MERGERS.names())
