"""The spec's cross-field rules for gradient coding and the parameter server: a bad combination
is refused with a message that names the field."""

from typing import Any

import pytest

from service.spec import ExperimentSpec


def spec(**dist: Any) -> dict[str, Any]:
    faults = dist.pop("faults", {})
    train = {"max_steps": 10, "batch_size": 64, **dist.pop("train", {})}
    return {
        "name": "coding-rules",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"}, "model": {"name": "mlp"}},
        "train": train,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "distributed": {"num_workers": 8, "strategy": "parameter_server", **dist},
        "faults": faults,
    }


FR = {"scheme": "fractional_repetition", "stragglers": 1}
MSGC = {"scheme": "multiplexed_sgc", "stragglers": 2, "burst": 2, "window": 3}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gradient_coding": {"scheme": "cyclic_repetition", "stragglers": 1}, "aggregator": {"name": "median", "f": 1}},
     "distributed.aggregator: robust rule 'median' combines only with"),
    ({"gradient_coding": {"scheme": "fractional_repetition", "stragglers": 3}, "aggregator": {"name": "krum", "f": 2}},
     "distributed.aggregator.f: with gradient_coding.stragglers=3 only n - s = 5"),
    ({"gradient_coding": MSGC, "train": {"batch_size": 63}}, "train.batch_size: 63 is too small"),
    ({"gradient_coding": MSGC, "faults": {"byzantine": {"count": 1, "attack": "sign_flip"}}},
     "faults.byzantine.attack: gradient attacks are not simulated"),
    ({"faults": {"kill": {"step": 3}}, "max_failures": 1}, "faults.kill: strategy parameter_server"),
    ({"train": {"grad_accum": 2}}, "train.grad_accum"),
])
def test_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExperimentSpec.model_validate(spec(**kwargs))


@pytest.mark.parametrize("kwargs", [
    {"gradient_coding": FR, "aggregator": {"name": "median", "f": 2}},  # 7 messages reach the rule
    {"gradient_coding": MSGC},  # batch 64 = 8 (B + (W - 1)(lambda + 1))
    {"gradient_coding": MSGC, "faults": {"byzantine": {"count": 1, "attack": "label_flip"}}},
    {"aggregator": {"name": "krum", "f": 2}, "faults": {"byzantine": {"count": 2, "attack": "alie"}}},
])
def test_allowed(kwargs: dict[str, Any]) -> None:
    ExperimentSpec.model_validate(spec(**kwargs))
