"""Every registered rule and attack, from its default config: a rule returns the common gradient
when every worker sends it, and an attack rewrites the liars' rows exactly when its config says it
acts on gradients."""

import pytest
import torch

from algorithms.aggregation import config as C
from algorithms.aggregation.attacks import ATTACKS
from algorithms.aggregation.registry import RULES


def _name(config_cls: type) -> str:
    return str(config_cls.model_fields["name"].annotation.__args__[0])


@pytest.mark.parametrize("config_cls", list(RULES), ids=lambda c: c.__name__)
def test_identical_inputs_aggregate_to_themselves(config_cls: type[C.RuleBase]) -> None:
    n = 9
    cfg = RULES.config(_name(config_cls))
    cfg.f = max(0, min(1, cfg.max_f(n)))
    cfg.validate_for(n)
    g = torch.randn(37, generator=torch.Generator().manual_seed(1))
    out = RULES.build(cfg)(g.expand(n, -1).clone())
    assert cfg.ROBUST or config_cls is C.MeanConfig
    if config_cls is C.FlagConfig:  # a subspace of normalised gradients: the direction is kept
        torch.testing.assert_close(out / out.norm(), g / g.norm(), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(out, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_cls", list(ATTACKS), ids=lambda c: c.__name__)
def test_attack_acts_where_its_config_says(config_cls: type[C.AttackBase]) -> None:
    attack = ATTACKS.build(ATTACKS.config(_name(config_cls)))
    if config_cls.ACTS_ON == "data":
        assert attack is None  # the liars' rows are their own gradients of poisoned data
        return
    assert attack is not None
    honest = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    rows = attack(honest, 2, torch.Generator().manual_seed(3))
    assert rows.shape == (2, 20)
    assert not any(torch.allclose(row, h) for row in rows for h in honest)
    assert not torch.allclose(rows.mean(0), honest.mean(0))


def test_every_config_of_the_spec_is_registered() -> None:
    rules = C.AggregatorConfig.__origin__.__args__  # type: ignore[attr-defined]
    attacks = C.AttackConfig.__origin__.__args__  # type: ignore[attr-defined]
    assert sorted(map(_name, rules)) == RULES.names()
    assert sorted(map(_name, attacks)) == ATTACKS.names()
    with pytest.raises(ValueError, match="aggregation rule 'mean' is already registered"):
        RULES.register(C.MeanConfig, lambda cfg: None)
