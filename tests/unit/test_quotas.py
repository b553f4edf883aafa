"""Quotas and fair queueing: a user limited to one run gets them one at a time and in order,
another user's later run is not stuck behind them, GPUs and projects are limited alike, and every
run left queued says why (the scheduler against an in-memory launcher and a real SQLite file)."""

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from service.launcher import JobState, submission_id_for
from service.quotas import Candidate, Limits, Quotas, Usage, fair_order
from service.reconciler import Reconciler
from service.repo import experiments as exp_repo
from service.repo import runs as runs_repo
from service.scheduler import Scheduler
from service.spec import parse_spec
from tests.fakes import MemoryLauncher, MemoryTracker

QUICKSTART = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text()


def submit(sessions, owner: str, project: str = "default", gpus: int = 0) -> str:  # type: ignore[no-untyped-def]
    doc = yaml.safe_load(QUICKSTART)
    doc["project"] = project
    if gpus:
        doc["distributed"].update(use_gpu=True, num_workers=gpus)
    spec = parse_spec(json.dumps(doc))
    from service.spec.derived import demand, gpus_held

    with sessions() as s:
        exp, _ = exp_repo.create_experiment(s, spec=doc, resolved=spec.resolved(), owner=owner, gpus=gpus_held(spec),
                                            demand=demand(spec))
        s.commit()
    time.sleep(0.002)  # distinct creation times: FIFO is by creation
    return exp.runs[0].id


def run(sessions, run_id: str):  # type: ignore[no-untyped-def]
    with sessions() as s:
        return runs_repo.get_run(s, run_id)


def finish(launcher: MemoryLauncher, reconciler: Reconciler, run_id: str) -> None:
    launcher.jobs[submission_id_for(run_id)] = JobState("SUCCEEDED")
    reconciler.tick()


def parts(sessions, quotas: Quotas = Quotas(), max_concurrent: int = 4):  # type: ignore[no-untyped-def]
    launcher, tracker = MemoryLauncher(), MemoryTracker()
    return (Scheduler(sessions, launcher, tracker, max_concurrent=max_concurrent, storage_path="/s", quotas=quotas),
            Reconciler(sessions, launcher, tracker), launcher)


def test_a_user_limited_to_one_run_gets_them_in_order_and_others_are_not_stuck(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, rec, launcher = parts(sessions, Quotas(per_user={"alice": Limits(runs=1)}))
    a = [submit(sessions, "alice") for _ in range(3)]
    b = submit(sessions, "bob")
    assert sched.tick() == 2
    assert [run(sessions, r).status for r in a] == ["dispatched", "queued", "queued"]
    assert run(sessions, b).status == "dispatched"
    assert run(sessions, a[1]).waiting == "user quota: 1 run (alice)"
    assert run(sessions, a[0]).waiting is None and run(sessions, b).waiting is None
    for done, nxt in ((a[0], a[1]), (a[1], a[2])):
        assert sched.tick() == 0  # alice is at her quota while her run is active
        finish(launcher, rec, done)
        assert sched.tick() == 1
        assert run(sessions, nxt).status == "dispatched" and run(sessions, nxt).waiting is None
    assert run(sessions, a[2]).status == "dispatched"


def test_round_robin_over_users_at_one_slot(sessions) -> None:  # type: ignore[no-untyped-def]
    """One run at a time on the cluster: alice's burst of three, then bob's one; bob goes second."""
    sched, rec, launcher = parts(sessions, max_concurrent=1)
    a = [submit(sessions, "alice") for _ in range(3)]
    b = submit(sessions, "bob")
    order = []
    for _ in range(4):
        assert sched.tick() == 1
        [active] = [r for r in [*a, b] if run(sessions, r).status == "dispatched"]
        order.append(active)
        for r in [*a, b]:
            if run(sessions, r).status == "queued":
                assert run(sessions, r).waiting == "concurrency limit: 1 run active"
        finish(launcher, rec, active)
    assert order == [a[0], b, a[1], a[2]]


def test_gpu_and_project_quotas(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, rec, launcher = parts(sessions, Quotas(user=Limits(gpus=2), project=Limits(runs=1)))
    big = [submit(sessions, "carol", project="p1", gpus=2), submit(sessions, "carol", project="p2", gpus=2)]
    cpu = submit(sessions, "dave", project="p1")
    other = submit(sessions, "dave", project="p3")
    assert sched.tick() == 2
    assert run(sessions, big[0]).status == "dispatched" and run(sessions, other).status == "dispatched"
    assert run(sessions, big[1]).waiting == "user quota: 2 GPUs (carol holds 2)"
    assert run(sessions, cpu).waiting == "project quota: 1 run (p1)"
    finish(launcher, rec, big[0])
    assert sched.tick() == 2
    assert run(sessions, big[1]).status == "dispatched" and run(sessions, cpu).status == "dispatched"


def test_fair_order_is_least_served_first() -> None:
    t = [datetime(2026, 1, 1, 0, 0, i, tzinfo=UTC) for i in range(6)]
    cands = [Candidate("a1", "alice", "p", 0, 0, t[0]), Candidate("a2", "alice", "p", 0, 0, t[1]),
             Candidate("b1", "bob", "p", 0, 0, t[2]), Candidate("c1", "carol", "p", 0, 5, t[5]),
             Candidate("a3", "alice", "p", 0, 0, t[3])]
    usage = Usage()
    assert [c.run_id for c in fair_order(cands, usage)] == ["c1", "a1", "b1", "a2", "a3"]
    usage.add("alice", "p", 0)  # alice has a run going: bob first
    assert [c.run_id for c in fair_order(cands, usage)] == ["c1", "b1", "a1", "a2", "a3"]
    usage = Usage(last_served={"bob": t[4], "alice": t[0]})  # alice served longer ago: first
    assert [c.run_id for c in fair_order(cands, usage)] == ["c1", "a1", "b1", "a2", "a3"]


def test_a_run_the_cluster_cannot_hold_stays_queued_with_the_reason(sessions) -> None:  # type: ignore[no-untyped-def]
    """Two CPU-only nodes: a GPU run never goes to Ray; CPU runs go while the CPUs last."""
    sched, rec, launcher = parts(sessions)
    launcher.cluster = [{"CPU": 4.0, "memory": 8e9}, {"CPU": 2.0, "memory": 8e9}]
    gpu = submit(sessions, "erin", gpus=4)
    wide = [submit(sessions, "frank") for _ in range(4)]  # 2 workers x 1 CPU each
    assert sched.tick() == 3  # 6 CPUs: three runs of two
    assert run(sessions, gpu).status == "queued" and launcher.submits == 3
    assert run(sessions, gpu).waiting == "waiting for a node with 1 CPU, 1 GPU (no node has it)"
    assert run(sessions, wide[3]).waiting == "waiting for 2 CPU (0 of 6 free)"
    finish(launcher, rec, wide[0])
    assert sched.tick() == 1 and run(sessions, wide[3]).status == "dispatched"
    assert run(sessions, gpu).status == "queued"


def test_a_pool_is_a_resource_its_nodes_carry(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, _, launcher = parts(sessions)
    launcher.cluster = [{"CPU": 8.0}]
    doc = yaml.safe_load(QUICKSTART)
    doc["distributed"]["pool"] = "a100"
    spec = parse_spec(json.dumps(doc))
    from service.spec.derived import demand, worker_resources

    assert worker_resources(spec.distributed) == {"CPU": 1.0, "a100": 0.001}
    with sessions() as s:
        exp, _ = exp_repo.create_experiment(s, spec=doc, resolved=spec.resolved(), demand=demand(spec))
        s.commit()
    assert sched.tick() == 0
    assert run(sessions, exp.runs[0].id).waiting == "waiting for a node with 1 CPU, 0.001 a100 (no node has it)"
    launcher.cluster = [{"CPU": 8.0}, {"CPU": 8.0, "a100": 1000.0}]
    assert sched.tick() == 1
