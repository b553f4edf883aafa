"""The parameter server's loop (workers/parameter_server/) on in-process workers with a
simulated clock: coded training with stragglers equals full-batch SGD computed independently
here from the task's data streams, for every scheme; robust rules see what they should."""

from typing import Any

import pytest
import torch

from algorithms.coding.straggler_model import bursty_pattern
from service.spec import ExperimentSpec
from workers.parameter_server import Layout, LocalPool, ParameterServer, part_sizes
from workers.tasks import build_task

LR, STEPS = 0.2, 5
torch.set_num_threads(1)  # tiny matrices: threads only contend on a shared machine


def make_spec(n: int, coding: dict[str, Any] | None = None, *, batch: int = 60, steps: int = STEPS,
              faults: dict[str, Any] | None = None, aggregator: dict[str, Any] | None = None) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "ps-unit",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [16]}},
        "train": {"max_steps": steps, "batch_size": batch, "seed": 3, "log_every": 1},
        "optimizer": {"name": "sgd", "lr": LR},
        "distributed": {"num_workers": n, "strategy": "parameter_server", "gradient_coding": coding,
                        "aggregator": aggregator},
        "faults": faults or {},
    })


def reference(spec: ExperimentSpec, sizes: list[int], delay: int = 0) -> list[torch.Tensor]:
    """SGD on the union of the parts' batches (mean loss), each gradient applied ``delay`` steps
    after it was computed; written against the task API only."""
    assert spec.train is not None
    task = build_task(spec)
    torch.manual_seed(spec.train.seed)
    model = task.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    streams = [task.batches(rank=p, world=len(sizes), batch_size=s, seed=spec.train.seed)
               for p, s in enumerate(sizes)]
    pending: list[list[torch.Tensor]] = []

    def apply(grads: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(LR * g)

    for job in range(spec.train.max_steps):
        parts = [next(s) for s in streams]
        batch = (torch.cat([b[0] for b in parts]), torch.cat([b[1] for b in parts]))
        pending.append(list(torch.autograd.grad(task.loss(model, batch), params)))
        if job >= delay:
            apply(pending.pop(0))
    while pending:
        apply(pending.pop(0))
    return [p.detach() for p in params]


def assert_same(server: ParameterServer, ref: list[torch.Tensor]) -> None:
    for p, q in zip(server.params, ref, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=2e-5, rtol=1e-4)


def straggler(ranks: list[int], ms: float = 1000.0) -> dict[str, Any]:
    return {"stragglers": {"ranks": ranks, "delay": {"dist": "fixed", "mean_ms": ms}}}


@pytest.mark.parametrize(("scheme", "n", "s"), [("fractional_repetition", 4, 1), ("cyclic_repetition", 5, 2)])
def test_one_shot_code_with_stragglers_equals_full_batch(scheme: str, n: int, s: int) -> None:
    ranks = list(range(1, 1 + s))
    spec = make_spec(n, {"scheme": scheme, "stragglers": s}, faults=straggler(ranks))
    layout = Layout.from_spec(spec)
    assert layout.wire == (torch.float32 if scheme == "fractional_repetition" else torch.float64)
    server = ParameterServer(spec, layout, LocalPool(spec, layout, compute_s=0.01))
    server.train_model()
    assert [r.late for r in server.records] == [ranks] * STEPS  # decoded without the stragglers
    assert_same(server, reference(spec, layout.sizes))
    # the check can fail: training on the survivors' parts only is a different trajectory
    uncoded = make_spec(n)
    lost = [sz for p, sz in enumerate(part_sizes([1 / n] * n, 60)) if p not in ranks]
    with pytest.raises(AssertionError):
        assert_same(server, reference(uncoded, lost))


def test_uncoded_waits_for_all() -> None:
    spec = make_spec(4, faults=straggler([2]))
    layout = Layout.from_spec(spec)
    pool = LocalPool(spec, layout, compute_s=0.01)
    server = ParameterServer(spec, layout, pool)
    server.train_model()
    assert all(r.late == [] and r.wait_s >= 1.0 for r in server.records)
    assert_same(server, reference(spec, layout.sizes))


@pytest.mark.parametrize(("scheme", "burst", "window"), [("sequential_gc", 1, 3), ("sequential_gc", 2, 3),
                                                         ("multiplexed_sgc", 2, 3)])
def test_sequential_code_with_bursty_stragglers_equals_delayed_full_batch(scheme: str, burst: int,
                                                                          window: int) -> None:
    n, lam, steps = 6, 2, 8
    coding = {"scheme": scheme, "stragglers": lam, "burst": burst, "window": window}
    spec = make_spec(n, coding, batch=96, steps=steps)
    layout = Layout.from_spec(spec)
    T = layout.code.delay
    pattern = bursty_pattern(n, steps + T, burst, window, lam, p_start=0.4, p_continue=0.9, seed=11)
    pool = LocalPool(spec, layout, compute_s=0.01, delay_fn=lambda r, w: 1.0 if w in pattern[r] else 0.0)
    server = ParameterServer(spec, layout, pool)
    server.train_model()
    late = [set(r.late) for r in server.records]
    assert all(got <= set(pat) for got, pat in zip(late, pattern, strict=True))
    assert sum(len(x) for x in late) >= 4  # stragglers were really declared and outwaited
    assert [r.applied for r in server.records] == [None] * T + list(range(steps))
    assert all(r.wait_s < 0.1 for r in server.records)  # nobody waited for a 1 s straggler
    assert_same(server, reference(spec, layout.sizes, delay=T))


def test_sequential_waits_when_the_pattern_leaves_the_model() -> None:
    """A worker that straggles every round breaks the B = 1 bursts: the server waits for it
    every other round instead of missing a deadline."""
    coding = {"scheme": "sequential_gc", "stragglers": 1, "burst": 1, "window": 2}
    spec = make_spec(4, coding, steps=6, faults=straggler([0]))
    layout = Layout.from_spec(spec)
    server = ParameterServer(spec, layout, LocalPool(spec, layout, compute_s=0.01))
    server.train_model()
    waited = [r.wait_s >= 1.0 for r in server.records]
    assert any(waited) and not all(waited)
    assert_same(server, reference(spec, layout.sizes, delay=layout.code.delay))


class Spy:
    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.rows.append(rows.clone())
        return rows.median(dim=0).values


def test_robust_rule_sees_attacked_rows_uncoded() -> None:
    spec = make_spec(5, aggregator={"name": "median", "f": 1},
                     faults={"byzantine": {"ranks": [0], "attack": "sign_flip"}})
    layout = Layout.from_spec(spec)
    spy = Spy()
    server = ParameterServer(spec, layout, LocalPool(spec, layout, compute_s=0.01), rule=spy)
    server.train_model()
    assert len(spy.rows) == STEPS
    for rows in spy.rows:
        assert rows.shape[0] == 5
        torch.testing.assert_close(rows[0], -rows[1:].mean(0))  # sign flip of the honest mean


def test_robust_rule_with_fractional_repetition_sees_block_estimates() -> None:
    spec = make_spec(4, {"scheme": "fractional_repetition", "stragglers": 1},
                     aggregator={"name": "median", "f": 1}, faults=straggler([3]))
    layout = Layout.from_spec(spec)
    spy = Spy()
    server = ParameterServer(spec, layout, LocalPool(spec, layout, compute_s=0.01), rule=spy)
    server.train_model()
    for rows in spy.rows:  # workers 0, 1, 2 arrive; 0 and 1 share a block, 2 has the other
        assert rows.shape[0] == 3
        torch.testing.assert_close(rows[0], rows[1])
        assert not torch.allclose(rows[0], rows[2])


def test_real_robust_rule_builds_from_the_registry() -> None:
    spec = make_spec(5, aggregator={"name": "median", "f": 1}, steps=2,
                     faults={"byzantine": {"ranks": [0], "attack": "sign_flip"}})
    layout = Layout.from_spec(spec)
    server = ParameterServer(spec, layout, LocalPool(spec, layout, compute_s=0.01))
    server.train_model()
    assert server.rule is not None and len(server.records) == 2


def test_part_sizes_sum_and_refuse_empty_parts() -> None:
    assert part_sizes([0.5, 0.25, 0.25], 10) == [5, 3, 2]
    assert sum(part_sizes([1 / 7] * 7, 64)) == 64
    with pytest.raises(ValueError, match="empty"):
        part_sizes([0.9, 0.1], 5)


def test_wire_is_numpy_and_reads_back_without_copy_or_warning() -> None:
    """What RayPool sends through the object store: numpy (Ray stores and reads it zero-copy);
    the read-only arrays Ray hands back become tensors without a copy and without a warning."""
    import warnings

    import numpy as np

    from workers.parameter_server import from_wire, to_wire

    t = torch.arange(6, dtype=torch.float64)
    a = to_wire(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    a.setflags(write=False)  # as an array from the object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = from_wire(a)
    assert torch.equal(back, t) and back.data_ptr() == a.ctypes.data
    assert from_wire(t) is t  # in-process pools pass tensors through
