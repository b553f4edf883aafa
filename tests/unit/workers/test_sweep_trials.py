"""A sweep's trials start from the spec as submitted: what depends on a swept field is derived
for each trial (the evaluation period from ``train.max_steps``), and what the user wrote stays."""

import json
from typing import Any

from service.spec import parse_spec
from workers.sweep import trial_spec

SUBMITTED: dict[str, Any] = {
    "name": "sweep-unit",
    "task": {"kind": "image_classification", "dataset": {"name": "digits"}, "model": {"name": "mlp"}},
    "train": {"max_steps": 100, "batch_size": 32},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "sweep": {"parameters": {"train.max_steps": {"grid": [40, 400]}}},
}


def test_trials_derive_their_own_values_from_the_submitted_spec() -> None:
    resolved = parse_spec(json.dumps(SUBMITTED)).resolved()
    assert resolved["train"]["eval_every"] == 100  # the base run's own derived period
    for steps in (40, 400):
        trial = trial_spec(SUBMITTED, {"train.max_steps": steps})
        assert trial.sweep is None and trial.derived().eval_every == steps
        stale = trial_spec(resolved, {"train.max_steps": steps})  # what a trial built from the resolved spec got
        assert stale.derived().eval_every == 100
    written = {**SUBMITTED, "train": {**SUBMITTED["train"], "eval_every": 20}}
    assert trial_spec(written, {"train.max_steps": 400}).derived().eval_every == 20  # the user's own value stays


def test_a_trials_group_is_its_values_but_the_seed() -> None:
    from workers.sweep import group_label

    a = group_label({"distributed.aggregator": {"name": "flag", "f": 3}, "train.seed": 0,
                     "faults.byzantine.attack": {"name": "alie"}})
    b = group_label({"train.seed": 7, "faults.byzantine.attack": {"name": "alie"},
                     "distributed.aggregator": {"f": 3, "name": "flag"}})
    assert a == b == 'distributed.aggregator={"f":3,"name":"flag"}; faults.byzantine.attack={"name":"alie"}'
    assert group_label({"train.seed": 1}) == "all"
    assert group_label({"optimizer.lr": 0.1}) != group_label({"optimizer.lr": 0.2})
