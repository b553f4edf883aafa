"""The gradient exchange across real processes (gloo, spawned with torch.multiprocessing; no Ray).

Every rank sets known gradients, runs the exchange, and sends back what it ended with; the parent
checks it against the rule applied to all the gradients in one process.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from algorithms.aggregation.attacks import build_attack
from algorithms.aggregation.registry import build
from service.spec import ExperimentSpec
from tests.unit.workers import harness

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"
LIAR = 1
STEP = 3
RULES: list[dict[str, Any]] = [
    {"name": "mean"}, {"name": "median", "f": 1}, {"name": "trimmed_mean", "f": 1},
    {"name": "krum", "f": 0}, {"name": "multi_krum", "f": 0, "m": 2}, {"name": "bulyan", "f": 0},
    {"name": "geometric_median", "f": 1}, {"name": "flag", "f": 1, "r": 2},
]


def spec_doc(world: int, strategy: str, rule: dict[str, Any], attack: dict[str, Any] | None) -> dict[str, Any]:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["distributed"].update(num_workers=world, strategy=strategy, aggregator=rule)
    doc["train"]["batch_size"] = 16 * world
    if strategy == "deepspeed":
        doc["distributed"]["deepspeed"] = {"zero_stage": 0}
    if attack is not None:
        doc["faults"] = {"byzantine": {"ranks": [LIAR], "attack": attack}}
    return doc


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))  # 74 parameters


def rank_grads(model: nn.Module, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    d = sum(p.numel() for p in model.parameters())
    return torch.linspace(-1, 1, d) + 0.5 * torch.randn(d, generator=g)


def set_grads(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _worker(rank: int, world: int, cases: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    from workers.exchange import GatherExchange, ShardExchange, build_exchange
    from workers.plan import RunPlan

    out: dict[str, Any] = {}
    for key, doc, kw in cases:
        spec = ExperimentSpec.model_validate(doc)
        kind = kw.pop("kind", None)
        if kind == "gather":
            ex: Any = GatherExchange(spec, rank, world, **kw)
        elif kind == "shard":
            ex = ShardExchange(spec, rank, world, **kw)
        else:
            ex = build_exchange(spec, RunPlan.from_spec(spec).exchange, rank=rank, world=world)
        model = make_model()
        set_grads(model, rank_grads(model, rank))
        try:
            metrics = ex(model, STEP)
        except Exception as exc:
            raise RuntimeError(f"{key}: {exc!r}") from exc
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        out[key] = (flat.numpy(), metrics, type(ex).__name__)  # numpy: pickled by value
    return out


def run_ranks(world: int, cases: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    return harness.run_ranks(_worker, world, copy.deepcopy(cases), timeout_s=120)


def expected(world: int, rule: dict[str, Any], attack: dict[str, Any] | None, shards: int = 1) -> torch.Tensor:
    """The rule on all gradients; with ``shards > 1``, on each shard of coordinates separately."""
    model = make_model()
    x = torch.stack([rank_grads(model, r) for r in range(world)])
    if attack is not None:
        honest = x[[r for r in range(world) if r != LIAR]]
        params = {k: v for k, v in attack.items() if k != "name"}
        x[LIAR] = build_attack(attack["name"], **params)(honest, 1, torch.Generator())[0]
    size = -(-x.shape[1] // shards)
    return torch.cat([build(**rule)(part) for part in x.split(size, dim=1)])


def test_gather_and_shard_exchange_equal_the_rule_on_all_gradients() -> None:
    world = 3  # 74 coordinates: shards of 25, the last one padded; buckets of 16, the last short
    attack = {"name": "sign_flip", "scale": 5.0}
    rules = RULES
    cases = []
    for rule in rules:
        cases.append((f"gather/{rule['name']}", spec_doc(world, "ddp", rule, attack),
                      {"kind": "gather", "bucket_elems": 16}))
        cases.append((f"shard/{rule['name']}", spec_doc(world, "deepspeed", rule, attack), {"kind": "shard"}))
    for name in ("krum", "flag", "bulyan"):
        rule = next(r for r in RULES if r["name"] == name)
        cases.append((f"regather/{name}", spec_doc(world, "ddp", rule, attack),  # pass 2 gathers again
                      {"kind": "gather", "bucket_elems": 16, "keep_elems": 0}))
        cases.append((f"blockwise/{name}", spec_doc(world, "deepspeed", rule, attack),
                      {"kind": "shard", "exact_shards": False}))
    cases.append(("gaussian/gather", spec_doc(world, "ddp", {"name": "median", "f": 1}, {"name": "gaussian"}),
                  {"kind": "gather", "bucket_elems": 16}))
    cases.append(("gaussian/shard", spec_doc(world, "deepspeed", {"name": "median", "f": 1}, {"name": "gaussian"}),
                  {"kind": "shard"}))
    cases.append(("auto/ddp", spec_doc(world, "ddp", {"name": "median", "f": 1}, attack), {}))
    cases.append(("auto/deepspeed", spec_doc(world, "deepspeed", {"name": "median", "f": 1}, attack), {}))
    for strategy, layout in (("ddp", "shard"), ("deepspeed", "gather")):  # named in the spec
        doc = spec_doc(world, strategy, {"name": "flag", "f": 1, "r": 2}, attack)
        doc["distributed"]["exchange"] = layout
        cases.append((f"named/{strategy}", doc, {}))
    results = run_ranks(world, cases)

    for rule in rules:
        want = expected(world, rule, attack)
        for layout in ("gather", "shard"):
            for r in range(world):
                got, metrics, _ = results[r][f"{layout}/{rule['name']}"]
                torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6,
                                           msg=f"{layout} {rule} rank {r}")
                assert 0.0 <= metrics["exchange/liar_weight"] <= 1.0 and metrics["exchange/rule_ms"] > 0.0
    # Every rank computes the same seeded Gaussian lies.
    for layout in ("gather", "shard"):
        first = results[0][f"gaussian/{layout}"][0]
        assert all((results[r][f"gaussian/{layout}"][0] == first).all() for r in range(world))
    assert results[0]["auto/ddp"][2] == "GatherExchange"
    assert results[0]["auto/deepspeed"][2] == "ShardExchange"
    assert results[0]["named/ddp"][2] == "ShardExchange"
    assert results[0]["named/deepspeed"][2] == "GatherExchange"
    flag = expected(world, {"name": "flag", "f": 1, "r": 2}, attack)
    for strategy in ("ddp", "deepspeed"):
        torch.testing.assert_close(torch.from_numpy(results[0][f"named/{strategy}"][0]), flag, rtol=1e-5, atol=1e-6)
    # Gathering the buckets again in pass 2 (over keep_elems) gives what keeping them gives.
    for name in ("krum", "flag", "bulyan"):
        for r in range(world):
            assert (results[r][f"regather/{name}"][0] == results[r][f"gather/{name}"][0]).all(), (name, r)
            assert results[r][f"regather/{name}"][1]["exchange/comm_ms"] > 0.0
    # Blockwise shards (a decision per shard) are another rule: all ranks agree, and it is not
    # the exact one for Krum, which picks a worker per shard here.
    for name in ("krum", "flag", "bulyan"):
        rule = next(r for r in RULES if r["name"] == name)
        want = expected(world, rule, attack, shards=world)
        for r in range(world):
            torch.testing.assert_close(torch.from_numpy(results[r][f"blockwise/{name}"][0]), want,
                                       rtol=1e-5, atol=1e-6)


def test_no_exchange_for_the_plain_mean() -> None:
    from workers.plan import RunPlan

    for strategy in ("ddp", "deepspeed"):
        spec = ExperimentSpec.model_validate(spec_doc(4, strategy, {"name": "mean"}, None))
        assert RunPlan.from_spec(spec).exchange is None
        spec = ExperimentSpec.model_validate(spec_doc(4, strategy, {"name": "mean"}, {"name": "label_flip"}))
        assert RunPlan.from_spec(spec).exchange is None
