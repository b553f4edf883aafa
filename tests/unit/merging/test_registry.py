import subprocess
import sys

import pytest
from pydantic import TypeAdapter, ValidationError

from algorithms.merging import config as C
from algorithms.merging.base import MergeContext, Merger
from algorithms.merging.config import MergeConfig
from algorithms.merging.registry import MERGERS, build, names

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
def test_a_spec_section_builds_a_merger_that_reads_its_hyperparameters(raw: dict) -> None:
    cfg = TypeAdapter(MergeConfig).validate_python(raw)
    merger = MERGERS.build(cfg)
    assert isinstance(merger, Merger)
    for key, value in raw.items():
        if key not in ("method", "inputs", "base"):
            assert getattr(merger, key) == value, key


def test_known_methods_and_errors() -> None:
    assert names() == ["atlas", "average", "pleas", "task_arithmetic", "ties"]
    with pytest.raises(ValueError, match="unknown merging method 'soup'.*average"):
        build("soup", inputs=["a", "b"])
    with pytest.raises(ValueError, match="merging method 'ties' is already registered"):
        MERGERS.register(C.TiesConfig, lambda cfg, context=None: build("ties", inputs=["a", "b"]))
    with pytest.raises(TypeError, match="configured by TiesConfig"):  # a config of another method's class
        MERGERS.build(C.TaskArithmeticConfig.model_construct(method="ties", inputs=["a", "b"], scaling=1.0))


def test_the_context_reaches_the_methods_that_ask_for_it() -> None:
    def loss_fn(model: object, batch: object) -> object:
        return batch

    atlas = build("atlas", MergeContext(loss_fn=loss_fn), inputs=["a", "b"])
    assert atlas.loss_fn is loss_fn  # type: ignore[attr-defined]
    pleas = build("pleas", MergeContext(example_shape=[4, 4]), inputs=["a", "b"], data_free=True)
    assert pleas.input_shape == [4, 4]  # type: ignore[attr-defined]
    own = build("pleas", MergeContext(example_shape=[4, 4]), inputs=["a", "b"], data_free=True, input_shape=[16])
    assert own.input_shape == [16]  # type: ignore[attr-defined]  # the spec's shape wins


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


def test_each_config_declares_what_its_merge_needs() -> None:
    raw = {"method": "atlas", "inputs": ["a", "b"], "base": "adapters", "steps": 3,
           "data": {"batches": 2, "batch_size": 16}}  # fmt: skip
    cfg = TypeAdapter(MergeConfig).validate_python(raw)
    assert cfg.data is not None and cfg.data.batches == 2 and cfg.NEEDS_BASE and cfg.needs_data()
    assert cfg.needs_loss() and not cfg.needs_example_shape()
    unlabelled = cfg.model_copy(update={"unlabelled": True})
    assert unlabelled.needs_data() and not unlabelled.needs_loss()
    fixed = cfg.model_copy(update={"steps": 0})
    assert not fixed.needs_data() and not fixed.needs_loss()
    free = TypeAdapter(MergeConfig).validate_python({"method": "pleas", "inputs": ["a", "b"], "data_free": True})
    assert not free.needs_data() and free.needs_example_shape() and not free.NEEDS_BASE
    assert not free.model_copy(update={"input_shape": [64]}).needs_example_shape()
    assert TypeAdapter(MergeConfig).validate_python({"method": "pleas", "inputs": ["a", "b"]}).needs_data()
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TypeAdapter(MergeConfig).validate_python({**raw, "data": {"batches": 0}})
