"""The parameter server's worker: a Ray actor (:class:`AsyncGradientWorker`), or a plain object
in tests (:class:`GradientWorker`), computing coded gradient messages for the server."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from service.spec import ExperimentSpec
from workers.faults import Straggler
from workers.parameter_server.layout import Coeffs, WorkItem
from workers.plan import RunPlan
from workers.settings import setup_logging
from workers.strategy.base import AUTOCAST
from workers.tasks import build_task
from workers.tasks.base import Batch, to_device


class _PartStream:
    """Batches of one data part by job index, regenerated deterministically, the last few kept."""

    def __init__(self, batches: Iterator[Batch], keep: int) -> None:
        self.batches, self.keep = batches, keep
        self.cache: OrderedDict[int, Batch] = OrderedDict()
        self.next_job = 0

    def get(self, job: int) -> Batch:
        if job in self.cache:
            return self.cache[job]
        if job < self.next_job:
            raise RuntimeError(f"batch of job {job} was already dropped (keep={self.keep})")
        while self.next_job <= job:
            self.cache[self.next_job] = next(self.batches)
            self.next_job += 1
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return self.cache[job]


def to_wire(t: torch.Tensor) -> np.ndarray:
    """What crosses Ray's object store: a numpy array, which Ray stores and reads without copying
    (a torch tensor is pickled through ``torch.save``: two copies and a slow path, about 0.4 s per
    step for 13M parameters and two workers, measured)."""
    return t.detach().cpu().numpy()


def from_wire(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The tensor view of a wire array; arrays from the object store are read-only, and every
    reader here only reads them (weights are copied into the model, messages are combined)."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


class GradientWorker:
    """Computes coded messages: for each item, ``sum_p c_p * grad(size_p * loss(part p))`` with
    the summed loss appended as the last coordinate. The injected straggler delay comes after
    the computation: slept here when ``sleep``, else only reported (the simulated clock of
    :class:`LocalPool`, or :class:`AsyncGradientWorker`, which awaits it)."""

    def __init__(self, spec: ExperimentSpec, rank: int, sizes: list[int], keep: int,
                 wire: str = "float32", sleep: bool = True) -> None:
        assert spec.train is not None
        dist = spec.distributed
        self.rank, self.sizes, self.keep, self.sleep = rank, sizes, keep, sleep
        self.wire = getattr(torch, wire)
        self.seed = spec.train.seed
        use_cuda = dist.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.task = build_task(spec)
        torch.manual_seed(spec.train.seed)
        self.model = self.task.build_model().to(self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.amp = AUTOCAST.get(spec.train.precision)
        self.label_flip = rank in RunPlan.from_spec(spec).label_flip_ranks
        self.straggler = Straggler(spec.faults, rank, dist.num_workers)
        self.streams: dict[int, _PartStream] = {}
        self.lock = threading.Lock()
        self.loaded: Any = None

    def ready(self) -> int:
        return self.rank

    def configure(self, sizes: list[int], keep: int, wire: str) -> None:
        """Start over with another data split (benchmarks reuse the actors across methods)."""
        with self.lock:
            self.sizes, self.keep, self.wire = sizes, keep, getattr(torch, wire)
            self.streams, self.loaded = {}, None

    def _batch(self, part: int, job: int) -> Batch:
        if part not in self.streams:
            it = self.task.batches(rank=part, world=len(self.sizes), batch_size=self.sizes[part],
                                   seed=self.seed, label_flip=self.label_flip)
            self.streams[part] = _PartStream(it, self.keep)
        return self.streams[part].get(job)

    def _load(self, job: int, flat: torch.Tensor) -> None:
        if self.loaded == job:
            return
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.loaded = job

    def _joined(self, job: int, parts: list[int]) -> Batch | None:
        """The parts' batches concatenated, or None when they do not concatenate (ragged)."""
        batches = [self._batch(p, job) for p in parts]
        try:
            return tuple(torch.cat(ts) for ts in zip(*batches, strict=True))
        except (RuntimeError, ValueError, TypeError):  # ragged, or not tuples of tensors (a custom task)
            return None

    def _grad(self, job: int, parts: list[int], batch: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient and value of the summed loss over ``parts`` (``batch``: theirs, joined)."""
        batch = to_device(batch if batch is not None else self._batch(parts[0], job), self.device)
        torch.manual_seed(self.seed * 1_000_003 + job * 10_007 + parts[0])  # same dropout everywhere
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.task.loss(self.model, batch).float() * sum(self.sizes[p] for p in parts)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        g = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                       for x, p in zip(grads, self.params, strict=True)])
        return g, loss.detach()

    def _message(self, job: int, coeffs: Coeffs, flat: torch.Tensor) -> torch.Tensor:
        self._load(job, flat)
        dim = sum(p.numel() for p in self.params)
        acc = torch.zeros(dim + 1, dtype=self.wire, device=self.device)
        if len(coeffs) > 1 and all(c == 1.0 for _, c in coeffs):
            # a plain sum (fractional repetition): one pass over the parts' batches together;
            # every worker of the group runs the same pass, so their messages agree bit for bit
            parts = [p for p, _ in coeffs]
            joined = self._joined(job, parts)
            if joined is not None:
                g, loss = self._grad(job, parts, joined)
                acc[:-1].add_(g.to(self.wire))
                acc[-1] += loss.to(self.wire)
                return acc.cpu()
        for part, c in coeffs:  # real coefficients: per-part gradients combined in the wire dtype
            g, loss = self._grad(job, [part])
            acc[:-1].add_(g.to(self.wire), alpha=c)
            acc[-1] += c * loss.to(self.wire)
        return acc.cpu()

    def compute(self, items: list[WorkItem], *weights: torch.Tensor, delay_s: float | None = None,
                round: int | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
        """``weights[i]``: the flat weights of ``items[i]``'s job (Ray resolves top-level refs).
        ``delay_s`` replaces the spec's straggler delay (benchmarks replay a pattern); ``round``:
        the server's round, which a bursty straggler pattern follows."""
        t0 = time.perf_counter()
        with self.lock:
            out = [self._message(job, coeffs, w) for (job, coeffs), w in zip(items, weights, strict=True)]
        compute_s = time.perf_counter() - t0
        if delay_s is not None:
            delay = delay_s
            if self.sleep and delay > 0:
                time.sleep(delay)
        elif self.sleep:
            delay = self.straggler.delay(round)
        else:  # simulated clock: the same seeded delay stream, not slept
            delay = self.straggler.draw(round)
        return out, {"compute_s": compute_s, "delay_s": delay}


class AsyncGradientWorker(GradientWorker):
    """The Ray actor: an async actor, so computations run one at a time in the event loop's
    thread (one thread: no malloc arena per pool thread, no lock contention) and an injected
    delay is awaited, so a late message never holds back the worker's next task."""

    def __init__(self, spec: ExperimentSpec, rank: int, sizes: list[int], keep: int,
                 wire: str = "float32") -> None:
        setup_logging()
        super().__init__(spec, rank, sizes, keep, wire, sleep=False)
        torch.set_num_threads(max(1, int(RunPlan.from_spec(spec).resources_per_worker.get("CPU", 1.0))))

    async def compute_async(self, items: list[WorkItem], *weights: np.ndarray, delay_s: float | None = None,
                            round: int | None = None) -> tuple[list[np.ndarray], dict[str, float]]:
        out, info = self.compute(items, *(from_wire(w) for w in weights), delay_s=delay_s, round=round)
        if info["delay_s"] > 0:
            await asyncio.sleep(info["delay_s"])
        return [to_wire(o) for o in out], info
