"""PartitionedOptimizer with 2 gloo processes: it equals the unpartitioned optimizer, each rank holds
state only for the parameters it owns, and a gathered checkpoint resumes exactly."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from algorithms.optimizers.partitioned import PartitionedOptimizer, assign_owners
from algorithms.optimizers.registry import build
from tests.unit.optimizers.helpers import CountingClosure, TwoLayer, batches, loss_of

CASES: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.01},
    "galore": {"lr": 1e-2, "rank": 4, "update_proj_gap": 2},
    "dct": {"lr": 1e-2, "rank": 4, "update_proj_gap": 2},
    "lorenza": {"lr": 1e-2, "rank": 4, "update_proj_gap": 3, "n_directions": 2, "plus": True},
    "sam": {"lr": 1e-2, "momentum": 0.9},
    "adazo_sam": {"lr": 1e-2, "n_directions": 2},
}
# Cases run with two parameter groups, fc1 and fc2, with these hyperparameters. With TwoLayer's
# sizes rank 0 owns fc1 and rank 1 fc2: for adazo_sam only rank 1's group wants a perturbation
# (rho > 0), and both ranks must still probe, as the unpartitioned optimizer does.
GROUPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {"adazo_sam": ({"rho": 0.0}, {"rho": 0.1, "mu": 1e-2})}
STEPS = 6


def params_of(model: TwoLayer, name: str) -> Any:
    if name not in GROUPS:
        return model.parameters()
    first, second = GROUPS[name]
    return [{"params": list(model.fc1.parameters()), **first}, {"params": list(model.fc2.parameters()), **second}]


def run(opt: Any, model: TwoLayer, data: list[Any]) -> None:
    for batch in data:
        if getattr(opt, "needs_closure", False):
            closure = CountingClosure(model, list(model.parameters()), batch)
            opt.step(closure)
            assert closure.backwards == (2 if type(getattr(opt, "inner", opt)).__name__ == "SAM" else 1)
        else:
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    data = batches(STEPS)
    for name, hp in CASES.items():

        def make(groups: list[dict[str, Any]], name: str = name, hp: dict[str, Any] = hp) -> torch.optim.Optimizer:
            return build(name, groups, **hp)

        model = TwoLayer()
        opt = PartitionedOptimizer(params_of(model, name), make)
        run(opt, model, data[:3])
        gathered: list[Any] = [opt.gather_state_dict(0)]
        dist.broadcast_object_list(gathered, src=0)
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        run(opt, model, data[3:])
        resumed_model = TwoLayer()
        resumed_model.load_state_dict(snapshot)
        resumed = PartitionedOptimizer(params_of(resumed_model, name), make)
        resumed.load_state_dict(gathered[0])
        run(resumed, resumed_model, data[3:])
        index: dict[torch.Tensor, int] = {p: i for i, p in enumerate(model.parameters())}
        inner_state = opt.inner.state
        results[name] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "resumed": [p.detach().clone() for p in resumed_model.parameters()],
            "with_state": sorted(index[p] for p, s in inner_state.items() if s and p in index),
            "owned": sorted(index[p] for p, r in opt.owner.items() if r == rank),
            "shards": sorted(gathered[0]["shards"]),
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_partitioned_equals_unpartitioned_with_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    data = batches(STEPS)
    n_params = len(list(TwoLayer().parameters()))
    for name, hp in CASES.items():
        ref = TwoLayer()
        run(build(name, params_of(ref, name), **hp), ref, data)
        owned = [ranks[r][name]["owned"] for r in range(2)]
        assert sorted(owned[0] + owned[1]) == list(range(n_params)) and owned[0] and owned[1]
        if name in GROUPS:  # what the GROUPS case relies on
            assert owned == [[0, 1], [2, 3]]
        for r in range(2):
            res = ranks[r][name]
            for a, b, c in zip(res["params"], res["resumed"], ref.parameters(), strict=True):
                assert torch.allclose(a, c.detach(), atol=1e-6, rtol=0), (name, r)
                assert torch.equal(a, b), (name, r)  # a gathered checkpoint resumes exactly
            assert res["with_state"] == res["owned"], (name, r)  # state only for owned parameters
            assert res["shards"] == [0, 1]


def test_owner_assignment_is_greedy_and_balanced() -> None:
    # 100 -> 0; 60, 30, 10 -> 1 (load 100); 5 -> tie, lower rank
    assert assign_owners([10, 100, 30, 60, 5], 2) == [1, 0, 1, 1, 0]
    assert assign_owners([4, 4, 4, 4], 3) == [0, 1, 2, 0]
    assert assign_owners([7], 4) == [0]


def test_single_process_is_a_pass_through() -> None:
    data = batches(4)
    a, b = TwoLayer(), TwoLayer()
    run(PartitionedOptimizer(a.parameters(), lambda g: build("galore", g, lr=1e-2, rank=4)), a, data)
    run(build("galore", b.parameters(), lr=1e-2, rank=4), b, data)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
