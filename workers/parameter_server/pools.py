"""Where the parameter server's workers run: Ray actors (:class:`RayPool`) or in-process objects
on a simulated clock (:class:`LocalPool`, for tests), behind one :class:`Pool` interface."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from service.spec import ExperimentSpec
from workers.parameter_server.layout import Layout, WorkItem
from workers.parameter_server.worker import AsyncGradientWorker, GradientWorker, from_wire, to_wire
from workers.plan import RunPlan


class Pool(Protocol):
    def put(self, value: torch.Tensor) -> Any: ...
    def submit(self, worker: int, round: int, items: list[WorkItem], weights: list[Any]) -> Any: ...
    def wait(self, handles: list[Any], num_returns: int, timeout: float | None) -> list[Any]: ...
    def get(self, handle: Any) -> tuple[list[torch.Tensor], dict[str, float]]: ...
    def clock(self) -> float: ...
    def close(self) -> None: ...


def _actor_options(spec: ExperimentSpec) -> dict[str, Any]:
    res = dict(RunPlan.from_spec(spec).resources_per_worker)
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0),
                            "max_concurrency": 64}  # late tasks await their delay meanwhile
    if res:
        opts["resources"] = res
    return opts


class RayPool:
    """One actor per worker; ``ray.put`` once per step, ``ray.wait`` for the first answers.
    ``delay_fn(round, worker)`` replaces the spec's straggler delays (benchmarks)."""

    def __init__(self, spec: ExperimentSpec, layout: Layout,
                 delay_fn: Callable[[int, int], float] | None = None) -> None:
        import ray

        if not ray.is_initialized():
            ray.init()  # inside a Ray job: the job's cluster
        self.ray = ray
        actor: Any = ray.remote(AsyncGradientWorker).options(**_actor_options(spec))
        wire = str(layout.wire).removeprefix("torch.")
        self.actors: list[Any] = [actor.remote(spec, w, layout.sizes, layout.keep, wire)
                       for w in range(layout.n_workers)]
        ray.get([a.ready.remote() for a in self.actors])
        self.delay_fn = delay_fn

    def reconfigure(self, layout: Layout) -> None:
        wire = str(layout.wire).removeprefix("torch.")
        self.ray.get([a.configure.remote(layout.sizes, layout.keep, wire) for a in self.actors])

    def put(self, value: torch.Tensor) -> Any:
        return self.ray.put(to_wire(value))

    def submit(self, worker: int, round: int, items: list[WorkItem], weights: list[Any]) -> Any:
        delay = None if self.delay_fn is None else self.delay_fn(round, worker)
        return self.actors[worker].compute_async.remote(items, *weights, delay_s=delay, round=round)

    def wait(self, handles: list[Any], num_returns: int, timeout: float | None) -> list[Any]:
        ready, _ = self.ray.wait(handles, num_returns=num_returns, timeout=timeout)
        return list(ready)

    def get(self, handle: Any) -> tuple[list[torch.Tensor], dict[str, float]]:
        out, info = self.ray.get(handle)
        return [from_wire(o) for o in out], info

    def clock(self) -> float:
        return time.perf_counter()

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


@dataclass(eq=False)
class _Pending:
    arrival: float
    value: tuple[list[torch.Tensor], dict[str, float]]


class LocalPool:
    """In-process workers and a simulated clock (``distributed.placement: in_process``, and tests):
    a result arrives ``compute_s`` (by default the worker's measured compute time, as if every
    worker had a core of its own) plus its injected delay after submission; ``delay_fn(round,
    worker)`` can override the delays."""

    def __init__(self, spec: ExperimentSpec, layout: Layout,
                 delay_fn: Callable[[int, int], float] | None = None, compute_s: float | None = None) -> None:
        wire = str(layout.wire).removeprefix("torch.")
        self.workers = [GradientWorker(spec, w, layout.sizes, layout.keep, wire, sleep=False)
                        for w in range(layout.n_workers)]
        self.delay_fn, self.compute_s, self.now = delay_fn, compute_s, 0.0

    def put(self, value: torch.Tensor) -> Any:
        return value.clone()

    def submit(self, worker: int, round: int, items: list[WorkItem], weights: list[Any]) -> Any:
        start = time.perf_counter()
        out, info = self.workers[worker].compute(items, *weights, round=round)
        compute = time.perf_counter() - start if self.compute_s is None else self.compute_s
        delay = info["delay_s"] if self.delay_fn is None else self.delay_fn(round, worker)
        return _Pending(self.now + compute * (1 + 1e-3 * worker) + delay, (out, info))

    def wait(self, handles: list[Any], num_returns: int, timeout: float | None) -> list[Any]:
        limit = math.inf if timeout is None else self.now + timeout
        ready = [h for h in sorted(handles, key=lambda h: h.arrival) if h.arrival <= limit][:num_returns]
        if len(ready) == num_returns and ready:
            self.now = max(self.now, ready[-1].arrival)
        elif timeout is not None:
            self.now = limit
        return ready

    def get(self, handle: Any) -> tuple[list[torch.Tensor], dict[str, float]]:
        return handle.value  # type: ignore[no-any-return]

    def clock(self) -> float:
        return self.now

    def close(self) -> None:
        self.workers = []
