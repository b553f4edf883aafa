import subprocess
import sys

import pytest
from pydantic import TypeAdapter, ValidationError

from algorithms.merging.base import Merger
from algorithms.merging.config import MergeConfig
from algorithms.merging.registry import build, build_from_config, known, register

CONFIGS = [
    {"method": "average", "inputs": ["a", "b"], "weights": [1.0, 3.0]},
    {"method": "task_arithmetic", "inputs": ["a", "b"], "base": "c", "scaling": 0.5},
    {"method": "ties", "inputs": ["a", "b", "d"], "base": "c", "density": 0.3, "trim_scope": "tensor"},
    {"method": "pleas", "inputs": ["a", "b"], "target_width": 1.5, "propagate": True},
    {"method": "atlas", "inputs": ["a", "b"], "base": "c", "steps": 5, "unlabelled": True},
    {"method": "atlas", "inputs": ["a", "b"], "base": "c", "init": "mean", "blockwise": False, "lr": 1e-3,
     "weight_decay": 0.0},
    {"method": "atlas", "inputs": ["a", "b"], "base": "c", "init": 0.5},  # a number, as before
]


@pytest.mark.parametrize("raw", CONFIGS, ids=lambda r: r["method"])
def test_build_from_config_passes_hyperparameters(raw: dict) -> None:
    cfg = TypeAdapter(MergeConfig).validate_python(raw)
    merger = build_from_config(cfg)
    assert isinstance(merger, Merger)
    for key, value in raw.items():
        if key not in ("method", "inputs", "base"):
            assert getattr(merger, key) == value, key


def test_known_methods_and_errors() -> None:
    assert known() == ["atlas", "average", "pleas", "task_arithmetic", "ties"]
    with pytest.raises(ValueError, match="unknown merging method 'soup'.*average"):
        build("soup")
    with pytest.raises(ValueError, match="already registered"):
        register("ties", lambda **kw: build("ties"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "average", "inputs": ["a", "b"], "weights": [1.0]}, "one per input"),
        ({"method": "pleas", "inputs": ["a", "b", "c"]}, "exactly 2 models"),
        ({"method": "ties", "inputs": ["a", "b"], "density": 0.0}, "greater than 0"),
        ({"method": "average", "inputs": ["a"]}, "at least 2"),
        ({"method": "pleas", "inputs": ["a", "b"], "width": 1.0}, "Extra inputs"),
        ({"method": "atlas", "inputs": ["a", "b"], "base": "c", "init": "ones"}, "'zero' or 'mean'"),
    ],
)
def test_bad_configs(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(MergeConfig).validate_python(raw)


def test_atlas_init_null_keeps_its_former_meaning() -> None:
    """Specs written when ``init: null`` meant 1 / number of inputs still mean that."""
    raw = {"method": "atlas", "inputs": ["a", "b"], "base": "c", "init": None}
    assert TypeAdapter(MergeConfig).validate_python(raw).init == "mean"


def test_config_does_not_import_torch() -> None:
    code = "import sys, algorithms.merging.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_section_and_adapter_base_are_not_hyperparameters() -> None:
    raw = {"method": "atlas", "inputs": ["a", "b"], "base": "adapters", "steps": 3,
           "data": {"batches": 2, "batch_size": 16}}  # fmt: skip
    cfg = TypeAdapter(MergeConfig).validate_python(raw)
    assert cfg.hparams() == {"steps": 3, "lr": 0.01, "weight_decay": 0.1, "unlabelled": False, "init": "zero",
                             "blockwise": True}  # fmt: skip
    assert cfg.data is not None and cfg.data.batches == 2 and cfg.needs_base() and cfg.needs_data()
    assert not TypeAdapter(MergeConfig).validate_python({"method": "pleas", "inputs": ["a", "b"],
                                                         "data_free": True}).needs_data()  # fmt: skip
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TypeAdapter(MergeConfig).validate_python({**raw, "data": {"batches": 0}})
