"""The spec's optimizer section: every name builds, ZeRO stages for the projected optimizers."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from algorithms.optimizers import config as C
from algorithms.optimizers.registry import OPTIMIZERS, build, names

ROOT = Path(__file__).resolve().parents[3]


def test_every_configured_name_is_registered_and_builds_from_its_defaults() -> None:
    union = typing.get_args(typing.get_args(C.OptimizerConfig)[0])
    configured = sorted(typing.get_args(cls.model_fields["name"].annotation)[0] for cls in union)
    assert configured == names()
    for cls in union:
        name = typing.get_args(cls.model_fields["name"].annotation)[0]
        cfg = cls(name=name, lr=0.01)
        opt = OPTIMIZERS.build(cfg, torch.nn.Linear(6, 4).parameters())
        assert isinstance(opt, torch.optim.Optimizer)


def test_build_validates_hyperparameters() -> None:
    params = torch.nn.Linear(3, 3).parameters()
    with pytest.raises(ValueError, match="rank"):
        build("galore", params, lr=0.1, rank=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build("adamx", params, lr=0.1)


@pytest.mark.parametrize("name", ["galore", "dct", "lorenza"])
def test_projected_optimizers_accept_zero_1_2_and_reject_zero_3(name: str) -> None:
    cfg = {"galore": C.GaLoreConfig, "dct": C.DCTConfig, "lorenza": C.LorenzaConfig}[name](name=name, lr=0.01)
    for stage in (None, 0, 1, 2):
        cfg.check_distributed("deepspeed", stage, "bf16")
    cfg.check_distributed("ddp", None, "fp32")
    with pytest.raises(ValueError, match="stage 3"):
        cfg.check_distributed("deepspeed", 3, "fp32")


def test_lorenza_example_validates() -> None:
    from service.spec.parse import parse_spec

    spec = parse_spec((ROOT / "examples" / "lorenza-llama-sweep.yaml").read_text(), "application/yaml")
    assert spec.optimizer is not None and spec.optimizer.name == "lorenza"
