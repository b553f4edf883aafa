"""``task.kind: custom``: the user's package (examples/custom) through the task adapter and the
real training loop (Ray faked, harness.py), and the errors of user code named as theirs."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from service.spec import ExperimentSpec, parse_spec
from tests.unit.workers.harness import run_ranks, run_worker
from workers.tasks import build_task
from workers.tasks.custom import CustomTask

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "custom"
torch.set_num_threads(1)


@pytest.fixture()
def in_bundle(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The job's working directory is the code bundle: importable from there."""
    monkeypatch.chdir(EXAMPLE)
    yield EXAMPLE
    for name in [m for m in sys.modules if m == "mylab" or m.startswith(("mylab.", "userpkg"))]:
        del sys.modules[name]


def custom_spec(**changes: Any) -> ExperimentSpec:
    doc: dict[str, Any] = {
        "name": "custom-unit",
        "task": {"kind": "custom", "entrypoint": "mylab.task:build", "params": {"width": 16, "n_train": 512}},
        "train": {"max_steps": 40, "batch_size": 32, "log_every": 10, "eval_every": 20, "eval_batches": 4},
        "optimizer": {"name": "adamw", "lr": 0.01},
    }
    doc.update(changes)
    return ExperimentSpec.model_validate(doc)


def test_examples_validate() -> None:
    for name in ("spec.yaml", "command.yaml"):
        spec = parse_spec((EXAMPLE / name).read_text(), "application/yaml")
        assert spec.resolved() == parse_spec(spec.model_dump_json(), "application/json").resolved()


def test_adapter_shards_collates_and_evaluates(in_bundle: Path) -> None:
    task = build_task(custom_spec())
    assert isinstance(task, CustomTask) and task.user.width == 16  # params reached build()
    model = task.build_model()
    batch = next(task.batches(rank=1, world=2, batch_size=8, seed=0))
    assert set(batch) == {"x", "y"} and batch["x"].shape == (8, 8)  # default collate of dict samples
    seen = [set(map(tuple, next(task.batches(rank=r, world=2, batch_size=256, seed=0))["x"].tolist()))
            for r in range(2)]
    assert not seen[0] & seen[1]  # the two ranks' shards are disjoint
    loss = task.loss(model, batch)
    assert loss.shape == () and loss.requires_grad
    ev = task.evaluate(model, torch.device("cpu"), max_batches=100)
    data = task.user.eval_dataset()
    with torch.no_grad():
        full = torch.nn.functional.mse_loss(model(data.x).squeeze(-1), data.y)
    # 512 samples in 8 batches of 64: the mean of batch means is the mean over all
    assert ev["eval/loss"] == pytest.approx(float(full), rel=1e-5) and ev["eval/mae"] > 0


def test_the_training_loop_trains_a_custom_task(in_bundle: Path, tmp_path: Path) -> None:
    logger, _ = run_worker(custom_spec(), tmp_path)
    losses = [v for _, v in logger.metric_log["train/loss"]]
    assert logger.steps("train/loss") == [10, 20, 30, 40] and logger.steps("eval/mae") == [20, 40, 40]
    assert losses[-1] < 0.7 * losses[0], losses
    assert (tmp_path / "run" / "model").exists()


def test_errors_of_user_code_are_theirs(in_bundle: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "raises.py").write_text("def build():\n    raise RuntimeError('my data folder is missing')\n")
    (pkg / "vector.py").write_text(
        "import torch\nfrom mylab.task import build as base\n"
        "class T:\n    def __init__(self):\n        self.inner = base(width=4, n_train=64)\n"
        "    def model(self): return self.inner.model()\n"
        "    def train_dataset(self): return self.inner.train_dataset()\n"
        "    def eval_dataset(self): return None\n"
        "    def loss(self, model, batch): return (model(batch['x']).squeeze(-1) - batch['y']) ** 2\n"
        "def build(): return T()\n")
    (pkg / "partial.py").write_text("class T:\n    def model(self): ...\ndef build(): return T()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        def task(entrypoint: str) -> Any:
            return build_task(custom_spec(task={"kind": "custom", "entrypoint": entrypoint}))

        with pytest.raises(ModuleNotFoundError, match="nowhere"):
            task("nowhere.task:build")
        with pytest.raises(AttributeError, match="no function 'make'"):
            task("userpkg.raises:make")
        with pytest.raises(RuntimeError, match="my data folder is missing"):
            task("userpkg.raises:build")
        with pytest.raises(TypeError, match="lacks train_dataset, eval_dataset, loss"):
            task("userpkg.partial:build")
        vector = task("userpkg.vector:build")
        model = vector.build_model()
        batch = next(vector.batches(rank=0, world=1, batch_size=4, seed=0))
        with pytest.raises(TypeError, match=r"must return a scalar tensor, got \(4,\)"):
            vector.loss(model, batch)
        assert vector.evaluate(model, torch.device("cpu"), 2) == {}  # no evaluation set: nothing logged
    finally:
        sys.path.remove(str(tmp_path))


def test_custom_task_on_two_ranks_with_a_robust_rule_and_galore(tmp_path: Path) -> None:
    """Two gloo ranks (spawned), the median over the ranks' gradients, GaLore: the loop runs the
    robust exchange for a custom task as for a built-in one, and the loss falls."""
    losses, exchanged = run_ranks(_custom_rank, 2, str(tmp_path))[0]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0] and all(math.isfinite(v) for v in losses), losses
    assert "exchange/rule_ms" in exchanged  # the robust exchange ran


def _custom_rank(rank: int, world: int, out: str) -> tuple[list[float], list[str]]:
    import os

    os.chdir(EXAMPLE)
    spec = custom_spec(optimizer={"name": "galore", "lr": 0.01, "rank": 4, "update_proj_gap": 10},
                       distributed={"num_workers": 2, "aggregator": {"name": "median", "f": 0}})
    assert spec.resolve().distributed.exchange == "gather"
    logger, _ = run_worker(spec.resolve(), Path(out) / f"r{rank}", rank=rank, world=world)
    return [v for _, v in logger.metric_log.get("train/loss", [])], sorted(logger.metric_log)


LM_PACKAGE = '''
import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM


class Tokens(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        base = torch.arange(16) % 7  # a pattern the model can learn
        self.ids = torch.stack([(base + int(torch.randint(0, 7, (1,), generator=g))) % 7 for _ in range(n)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LM:
    def model(self):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))

    def train_dataset(self):
        return Tokens(256, 0)

    def eval_dataset(self):
        return Tokens(64, 1)

    def loss(self, model, batch):
        return model(**batch).loss


def build():
    return LM()
'''


@pytest.mark.parametrize("peft", [{"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                  {"name": "eva", "r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_peft_on_a_custom_transformers_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             peft: dict[str, Any]) -> None:
    """PEFT applies where the custom task's model is a transformers model (adapters only are
    trainable; EVA initialises from the task's own batches, which are the model's arguments)."""
    (tmp_path / "userlm.py").write_text(LM_PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = custom_spec(task={"kind": "custom", "entrypoint": "userlm:build"}, peft=peft,
                       optimizer={"name": "adamw", "lr": 0.01},
                       train={"max_steps": 20, "batch_size": 16, "log_every": 10, "eval_every": 20, "eval_batches": 2})
    logger, _ = run_worker(spec, tmp_path / "out")
    assert logger.metric_log["model/trainable_params"][0][1] < logger.metric_log["model/params"][0][1] / 2
    losses = [v for _, v in logger.metric_log["train/loss"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    sys.modules.pop("userlm", None)


def test_peft_refuses_a_custom_model_that_is_not_transformers(in_bundle: Path, tmp_path: Path) -> None:
    spec = custom_spec(peft={"name": "lora", "r": 2, "target_modules": ["0"]})
    with pytest.raises(TypeError, match="PEFT applies to a transformers model"):
        run_worker(spec, tmp_path)
