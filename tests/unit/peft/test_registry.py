"""Registry contract: names, errors, configs, and the import rules."""

import subprocess
import sys
import typing

import pytest
import torch
from pydantic import TypeAdapter

from algorithms.peft import config, registry
from algorithms.peft.base import PeftHandleProtocol
from algorithms.registry import fields_of
from tests.unit.peft.helpers import TinyMLP, mlp_batch


def test_every_config_name_is_registered() -> None:
    union = typing.get_args(typing.get_args(config.PeftConfig)[0])
    names = {typing.get_args(m.model_fields["name"].annotation)[0] for m in union}
    assert names == set(registry.names())


def test_unknown_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown PEFT method 'dora'; known: allora, corda"):
        registry.apply("dora", TinyMLP())
    with pytest.raises(ValueError, match="PEFT method 'lora' is already registered"):
        registry.PEFT.register(config.LoRAConfig, lambda cfg, model, *rest, **kw: registry.apply_lora(
            model, **fields_of(cfg)))


def test_a_spec_config_builds_a_handle() -> None:
    cfg = TypeAdapter(config.PeftConfig).validate_python(
        {"name": "lora_pro", "r": 2, "target_modules": ["fc1"]})
    handle = registry.PEFT.build(cfg, TinyMLP())
    assert isinstance(handle, PeftHandleProtocol)
    trainable, total = handle.param_counts()
    assert trainable == 2 * (12 + 10) and total > trainable


def test_data_driven_methods_require_batches() -> None:
    with pytest.raises(ValueError, match="needs init_batches"):
        registry.apply("lora_sb", TinyMLP(), target_modules=["fc1"])
    h = registry.apply("lora_sb", TinyMLP(), target_modules=["fc1"], batches=iter([mlp_batch()]),
                       init_samples=16)
    assert h.param_counts()[0] == 8 * 8


def test_config_imports_without_torch_and_algorithms_without_services() -> None:
    code = ("import sys, algorithms.peft.config; assert 'torch' not in sys.modules;"
            "import algorithms.peft.registry;"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'mlflow', 'fastapi', 'sqlalchemy', 'api', 'service', 'workers')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_optimizer_shares_group_dicts() -> None:
    """ALLoRA relies on torch keeping the very dicts param_groups returned."""
    handle = registry.apply("allora", TinyMLP(), r=2, target_modules=["fc1"])
    groups = handle.param_groups(handle.model, 0.1)
    opt = torch.optim.SGD(groups)
    assert all(a is b for a, b in zip(opt.param_groups, groups, strict=True))
