"""The liars shared by the ranks' exchange and the parameter server (``workers.robust``), and the
parameter server's evaluation on the training loop's cadence."""

from __future__ import annotations

from typing import Any

import torch

from service.spec import ExperimentSpec
from workers.robust import Liars


def spec(faults: dict[str, Any], *, strategy: str = "ddp", **train: Any) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "robust-unit",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [8]}},
        "train": {"max_steps": 5, "batch_size": 40, "seed": 2, **train},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "distributed": {"num_workers": 4, "strategy": strategy},
        "faults": faults,
    })


def rows() -> torch.Tensor:
    return torch.arange(4 * 6, dtype=torch.float32).view(4, 6)


def test_liars_replace_their_rows_the_same_way_everywhere() -> None:
    noise = {"byzantine": {"ranks": [1, 3], "attack": {"name": "gaussian", "std": 1.0}}}
    a, b = Liars(spec(noise), 4), Liars(spec(noise), 4)  # two ranks
    assert a.ranks == [1, 3] and a.among([0, 1, 2, 3]) == [1, 3] and a.among([2, 3]) == [1]
    x, y = a.replace(rows(), [1, 3], step=7), b.replace(rows(), [1, 3], step=7)
    assert torch.equal(x, y)
    assert torch.equal(x[[0, 2]], rows()[[0, 2]]) and not torch.equal(x[[1, 3]], rows()[[1, 3]])
    assert not torch.equal(a.replace(rows(), [1, 3], step=8), x)  # seeded per step
    assert not torch.equal(a.replace(rows(), [1, 3], step=7, offset=6), x)  # and per coordinate block


def test_sign_flip_is_minus_the_honest_mean_and_label_flip_sends_no_fake_gradient() -> None:
    flip = Liars(spec({"byzantine": {"ranks": [0], "attack": "sign_flip"}}), 4)
    torch.testing.assert_close(flip.replace(rows(), [0], step=0)[0], -rows()[1:].mean(0))
    labels = Liars(spec({"byzantine": {"ranks": [0], "attack": "label_flip"}}), 4)
    assert labels.ranks == [0] and labels.among([0, 1]) == []
    assert torch.equal(labels.replace(rows(), [0], step=0), rows())


def test_parameter_server_evaluates_on_the_cadence() -> None:
    from workers.parameter_server import Layout, LocalPool, ParameterServer

    class Recorder:
        enabled = True

        def __init__(self) -> None:
            self.evals: list[int] = []

        def metrics(self, values: dict[str, float], step: int) -> None:
            if "eval/accuracy" in values:
                self.evals.append(step)

        def flush(self, *, wait: bool = False) -> None:
            return None

    s = spec({}, strategy="parameter_server", eval_every=2)
    layout = Layout.from_spec(s)
    logger = Recorder()
    ParameterServer(s, layout, LocalPool(s, layout, compute_s=0.01), logger).train_model()  # type: ignore[arg-type]
    assert logger.evals == [2, 4, 5]
