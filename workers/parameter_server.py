"""``distributed.strategy: parameter_server``: a server loop in the job driver, one Ray actor per
worker, weights through the object store, gradients back, stragglers outwaited by coding.

Every step the server puts the flat weights in the object store once (``ray.put``) and asks each
worker for its message. What a worker computes depends on the spec:

* no ``gradient_coding``: worker ``i`` sends the summed-loss gradient of its own data part; the
  server waits for all ``n`` (wait-for-all) and averages them, or, with a robust
  ``distributed.aggregator`` (and simulated Byzantine workers), applies the rule to the ``n``
  per-worker mean gradients.
* a one-shot code (``fractional_repetition``, ``cyclic_repetition``, Tandon et al. 2017): worker
  ``i`` sends ``sum_j B[i, j] * g_j`` over its parts; the server waits for the first ``n - s``
  (``ray.wait``; it also takes any result already there), decodes the exact full-batch
  gradient (:func:`algorithms.coding.decode_gradient`) and steps. Late results are discarded. With
  ``fractional_repetition`` a robust rule may replace the decoder: it then sees the arrived
  workers' block gradients, each an unbiased estimate of the full gradient.
* a sequential code (``sequential_gc``, ``multiplexed_sgc``, Krishnan et al. 2023): job ``t``
  (the gradient of step ``t``) is computed at the weights of round ``t`` in rounds
  ``t .. t + T``. Each round the server waits ``(1 + patience)`` times the first worker's time,
  then declares the workers still missing stragglers if that keeps the pattern inside the
  (B, W, lambda)-bursty model, else waits for more (as the authors' simulator does). The code
  plans which unfinished tasks to repeat; results of declared stragglers are discarded (the
  schemes repeat work rather than reuse it). Job ``t``'s gradient is applied at the end of round
  ``t + T``, its deadline, whatever the stragglers did: the run is T-step delayed SGD,
  reproducible whatever the straggler pattern (the paper's experiments instead interleave
  T + 1 independent models).

Data: a step's global batch (``train.batch_size`` samples) is split into the code's parts (sizes
by the code's part fractions, largest remainder); part ``p`` is the stream
``task.batches(rank=p, world=n_parts, batch_size=size_p)``, which every worker that holds ``p``
replays identically, and its term is ``size_p * task.loss(part batch)`` (the summed loss), so the
decoded sum divided by the batch size is the mean-loss gradient of the whole batch. The RNG is
seeded per (job, part), so dropout masks agree between workers computing the same part. The loss
is decoded like the gradient (one more coordinate of each message).

Numerics: messages of codes with real coefficients (cyclic repetition) are combined and sent in
float64 from per-part gradients, so decoding amplifies no float32 rounding (see
``bench/RESULTS.md`` for the condition numbers); 0/1 codes send float32.

MLflow, per step: ``train/loss``, ``train/lr``, ``perf/step_time_s``, ``ps/wait_s``,
``ps/decode_s``, ``ps/num_late`` and ``ps/late/w<i>`` (1 for each worker that was late or
declared a straggler); eval metrics every ``train.eval_every``; the per-step record as the
artifact ``parameter_server/steps.jsonl``; the final model as ``model/``. With a sequential code
the ``ps/*`` metrics are logged per round (step = round + 1) and ``train/*`` per applied job.
Not supported here: checkpoints/restarts (``faults.kill``), optimizers that need extra forward
passes, fp16 (see the spec's rules).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from service.spec import ExperimentSpec
from workers.faults import Straggler, attack_generator, chosen_ranks, sample_delay_s
from workers.mlflow_log import RunLogger
from workers.model_io import save_final_model
from workers.optim import build_optimizer
from workers.schedule import build_scheduler
from workers.tasks import build_task
from workers.tasks.base import Batch, to_device

Coeffs = tuple[tuple[int, float], ...]
WorkItem = tuple[int, Coeffs]  # (job, ((part, coefficient), ...))
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- how a step's data is split and who computes what ------------------------------------------


def part_sizes(fractions: Sequence[float], total: int) -> list[int]:
    """Samples per part: ``fractions`` of ``total``, rounded by largest remainder (sum exact)."""
    raw = [f * total for f in fractions]
    sizes = [math.floor(r + 1e-9) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (sizes[i] - raw[i], i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) < 1:
        raise ValueError(f"train.batch_size {total} leaves a data part empty ({len(sizes)} parts)")
    return sizes


@dataclass
class Layout:
    """The code (if any), the data parts and how messages travel."""

    n_workers: int
    mode: str  # "uncoded" | "one_shot" | "sequential"
    sizes: list[int]
    code: Any = None
    stragglers: int = 0  # s of a one-shot code
    patience: float = 0.5
    wire: torch.dtype = torch.float32
    keep: int = 2  # batches each worker keeps per part (a job's parts are used up to T rounds late)

    @classmethod
    def from_spec(cls, spec: ExperimentSpec) -> Layout:
        from algorithms.coding.decode import unit_weights
        from algorithms.coding.registry import CODES

        assert spec.train is not None
        n, batch = spec.distributed.num_workers, spec.train.batch_size
        cfg = spec.distributed.gradient_coding
        if cfg is None:
            return cls(n, "uncoded", part_sizes([1.0 / n] * n, batch))
        code: Any = CODES.build(cfg, n)
        wire = torch.float32 if unit_weights(code) else torch.float64
        if hasattr(code, "assign"):  # a sequential code
            code.n_jobs = spec.train.max_steps
            return cls(n, "sequential", part_sizes(list(code.part_fractions), batch), code=code,
                       patience=float(getattr(cfg, "patience", 0.5)), wire=wire, keep=code.delay + 2)
        return cls(n, "one_shot", part_sizes([1.0 / code.n_parts] * code.n_parts, batch), code=code,
                   stragglers=cfg.stragglers, wire=wire)

    @property
    def n_parts(self) -> int:
        return len(self.sizes)

    def one_shot_items(self, worker: int, step: int) -> list[WorkItem]:
        if self.mode == "uncoded":
            return [(step, ((worker, 1.0),))]
        B = self.code.B
        return [(step, tuple((j, float(B[worker, j])) for j in self.code.parts(worker)))]

    def samples(self, coeffs: Coeffs) -> float:
        """``sum_p c_p * size_p``: how many samples a message's summed loss weighs."""
        return sum(c * self.sizes[p] for p, c in coeffs)


# ---- the worker (a Ray actor, or a plain object in tests) --------------------------------------


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

    def __init__(self, spec_json: dict[str, Any], rank: int, sizes: list[int], keep: int,
                 wire: str = "float32", sleep: bool = True) -> None:
        spec = ExperimentSpec.model_validate(spec_json)
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
        self.amp = _AMP.get(spec.train.precision)
        byz = spec.faults.byzantine
        self.label_flip = (byz is not None and byz.attack.name == "label_flip"
                           and rank in chosen_ranks(byz, dist.num_workers))
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
        except (RuntimeError, ValueError):
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

    def compute(self, items: list[WorkItem], *weights: torch.Tensor,
                delay_s: float | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
        """``weights[i]``: the flat weights of ``items[i]``'s job (Ray resolves top-level refs).
        ``delay_s`` replaces the spec's straggler delay (benchmarks replay a pattern)."""
        t0 = time.perf_counter()
        with self.lock:
            out = [self._message(job, coeffs, w) for (job, coeffs), w in zip(items, weights, strict=True)]
        compute_s = time.perf_counter() - t0
        if delay_s is not None:
            delay = delay_s
            if self.sleep and delay > 0:
                time.sleep(delay)
        elif self.sleep:
            delay = self.straggler.delay()
        else:  # simulated clock (tests): the same seeded delay stream, not slept
            spec = self.straggler.spec
            delay = sample_delay_s(spec.delay, self.straggler.rng) if self.straggler.active and spec else 0.0
        return out, {"compute_s": compute_s, "delay_s": delay}


class AsyncGradientWorker(GradientWorker):
    """The Ray actor: an async actor, so computations run one at a time in the event loop's
    thread (one thread: no malloc arena per pool thread, no lock contention) and an injected
    delay is awaited, so a late message never holds back the worker's next task."""

    def __init__(self, spec_json: dict[str, Any], rank: int, sizes: list[int], keep: int,
                 wire: str = "float32") -> None:
        super().__init__(spec_json, rank, sizes, keep, wire, sleep=False)
        cpus = ExperimentSpec.model_validate(spec_json).derived().resources_per_worker.get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))

    async def compute_async(self, items: list[WorkItem], *weights: np.ndarray,
                            delay_s: float | None = None) -> tuple[list[np.ndarray], dict[str, float]]:
        out, info = self.compute(items, *(from_wire(w) for w in weights), delay_s=delay_s)
        if info["delay_s"] > 0:
            await asyncio.sleep(info["delay_s"])
        return [to_wire(o) for o in out], info


# ---- pools: where the workers run ----------------------------------------------------------------


class Pool(Protocol):
    def put(self, value: torch.Tensor) -> Any: ...
    def submit(self, worker: int, round: int, items: list[WorkItem], weights: list[Any]) -> Any: ...
    def wait(self, handles: list[Any], num_returns: int, timeout: float | None) -> list[Any]: ...
    def get(self, handle: Any) -> tuple[list[torch.Tensor], dict[str, float]]: ...
    def clock(self) -> float: ...
    def close(self) -> None: ...


def _actor_options(spec: ExperimentSpec) -> dict[str, Any]:
    res = spec.derived().resources_per_worker
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
        self.actors: list[Any] = [actor.remote(spec.resolved(), w, layout.sizes, layout.keep, wire)
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
        return self.actors[worker].compute_async.remote(items, *weights, delay_s=delay)

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
    """In-process workers and a simulated clock (tests): a result arrives ``compute_s`` plus its
    injected delay after submission; ``delay_fn(round, worker)`` can override the delays."""

    def __init__(self, spec: ExperimentSpec, layout: Layout,
                 delay_fn: Callable[[int, int], float] | None = None, compute_s: float = 0.01) -> None:
        wire = str(layout.wire).removeprefix("torch.")
        self.workers = [GradientWorker(spec.resolved(), w, layout.sizes, layout.keep, wire, sleep=False)
                        for w in range(layout.n_workers)]
        self.delay_fn, self.compute_s, self.now = delay_fn, compute_s, 0.0

    def put(self, value: torch.Tensor) -> Any:
        return value.clone()

    def submit(self, worker: int, round: int, items: list[WorkItem], weights: list[Any]) -> Any:
        out, info = self.workers[worker].compute(items, *weights)
        delay = info["delay_s"] if self.delay_fn is None else self.delay_fn(round, worker)
        return _Pending(self.now + self.compute_s * (1 + 1e-3 * worker) + delay, (out, info))

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


# ---- the server ----------------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: int  # the optimizer step (one-shot) or round (sequential) this record is about
    late: list[int]
    wait_s: float
    decode_s: float
    step_s: float
    applied: int | None = None  # the job applied at the end of this round (sequential)
    decoded: list[int] = field(default_factory=list)
    compute_s: float = 0.0  # median compute time of the messages counted (excludes injected delay)


class ParameterServer:
    def __init__(self, spec: ExperimentSpec, layout: Layout, pool: Pool, logger: RunLogger | None = None,
                 *, rule: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        assert spec.train is not None and spec.optimizer is not None
        self.spec, self.train, self.layout, self.pool = spec, spec.train, layout, pool
        self.n = layout.n_workers
        self.logger = logger or RunLogger("", "", enabled=False)
        self.task = build_task(spec)
        torch.manual_seed(self.train.seed)
        self.model = self.task.build_model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(spec, self.model)
        self.scheduler = build_scheduler(self.optimizer, self.train)
        agg = spec.distributed.aggregator
        if rule is None and agg is not None and agg.ROBUST:
            from algorithms.aggregation.registry import RULES

            rule = RULES.build(agg)
        self.rule = rule
        byz = spec.faults.byzantine
        self.byz_spec = byz
        self.byzantine = chosen_ranks(byz, self.n)
        self.attack: Any = None
        if byz is not None and self.byzantine:
            from algorithms.aggregation.attacks import ATTACKS

            self.attack = ATTACKS.build(byz.attack)  # None for a data attack
        self.records: list[StepRecord] = []
        self.losses: list[float] = []

    # -- weights and updates --------------------------------------------------------------------
    def flat_weights(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).float()

    def _apply(self, grad: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.grad = grad[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        if self.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    # -- one-shot steps (uncoded or a one-shot code) --------------------------------------------
    def _combine(self, arrived: dict[int, torch.Tensor], step: int) -> tuple[torch.Tensor, float, dict[str, float]]:
        """Mean gradient and mean loss of the step's batch from the arrived messages."""
        lay, total = self.layout, float(sum(self.layout.sizes))
        workers = sorted(arrived)
        extra: dict[str, float] = {}
        byz = [w for w in workers if w in self.byzantine] if self.attack is not None else []
        honest = [w for w in workers if w not in byz]
        if self.rule is not None:  # robust: the rule sees per-worker mean-gradient estimates
            mass = {w: lay.samples(lay.one_shot_items(w, step)[0][1]) for w in workers}
            rows = torch.stack([arrived[w][:-1].float() / mass[w] for w in workers])
            if byz:
                idx = [workers.index(w) for w in byz]
                rows[idx] = self.attack(rows[[workers.index(w) for w in honest]], len(byz),
                                        attack_generator(self.byz_spec, step)).to(rows.dtype)
            grad = self.rule(rows)
            if byz:
                from algorithms.aggregation.base import liar_weight

                extra["exchange/liar_weight"] = float(liar_weight(rows, grad, [workers.index(w) for w in byz]))
            loss = sum(float(arrived[w][-1]) / mass[w] for w in honest) / max(1, len(honest))
            return grad, loss, extra
        msgs = dict(arrived)
        if byz:  # liars replace their coded message, computed from the honest ones
            fake = self.attack(torch.stack([arrived[w] for w in honest]).float(), len(byz),
                               attack_generator(self.byz_spec, step))
            for w, row in zip(byz, fake, strict=True):
                msgs[w] = row.to(arrived[w].dtype)
        if lay.mode == "uncoded":  # the mean over the data that arrived (all of it unless told not to wait)
            full = torch.stack([msgs[w] for w in workers]).sum(0)
            total = float(sum(lay.sizes[w] for w in workers))
        else:
            from algorithms.coding.decode import decode_gradient

            full = decode_gradient(lay.code, msgs)
        return (full[:-1] / total).float(), float(full[-1]) / total, extra

    def one_shot_step(self, step: int) -> StepRecord:
        pool, n = self.pool, self.n
        t0 = pool.clock()
        ref = pool.put(self.flat_weights())
        handles = {pool.submit(w, step, self.layout.one_shot_items(w, step), [ref]): w for w in range(n)}
        need = n - self.layout.stragglers  # uncoded from a spec: s = 0, wait for all
        ready = pool.wait(list(handles), need, None)
        rest = [h for h in handles if h not in ready]
        if rest:  # whatever else is already there helps (more rows: smaller decoding weights)
            ready += pool.wait(rest, len(rest), 0.0)
        wait_s = pool.clock() - t0
        arrived, extra, compute = {}, {}, []
        for h in ready:
            outs, info = pool.get(h)
            arrived[handles[h]] = outs[0]
            compute.append(info["compute_s"])
            if info["delay_s"] > 0:
                extra[f"fault/delay_s/w{handles[h]}"] = info["delay_s"]
        t1 = pool.clock()
        grad, loss, more = self._combine(arrived, step)
        extra.update(more)
        decode_s = pool.clock() - t1
        self._apply(grad)
        rec = StepRecord(step + 1, sorted(set(range(n)) - set(arrived)), wait_s, decode_s, pool.clock() - t0,
                         compute_s=statistics.median(compute))
        self._log(rec, {"train/loss": loss, **extra}, step + 1)
        self.losses.append(loss)
        return rec

    # -- sequential rounds ------------------------------------------------------------------------
    def _collect(self, r: int, handles: dict[Any, int], t0: float
                 ) -> list[tuple[int, list[torch.Tensor], dict[str, float]]]:
        """Wait as the scheme allows; return (worker, results) of those counted as on time."""
        code, pool = self.layout.code, self.pool
        missing = set(handles.values())
        got: list[tuple[int, list[torch.Tensor], dict[str, float]]] = []
        first: float | None = None
        patient = True
        while missing:
            timeout = None
            if first is not None and patient:
                timeout = max(0.0, first * (1 + self.layout.patience) - (pool.clock() - t0))
            ready = pool.wait([h for h, w in handles.items() if w in missing], 1, timeout)
            for h in ready:
                got.append((handles[h], *pool.get(h)))
                missing.discard(handles[h])
            if first is None:
                first = pool.clock() - t0
            if (not ready or not patient) and code.conforms(r, sorted(missing)):
                break  # the workers still missing fit the straggler model: move on
            if not ready:
                patient = False
        return got

    def sequential_round(self, r: int, state: dict[str, Any]) -> StepRecord:
        from algorithms.coding.decode import decode_job

        code, pool, total = self.layout.code, self.pool, float(sum(self.layout.sizes))
        T, jobs = code.delay, self.train.max_steps
        t0 = pool.clock()
        plan = code.assign(r)
        if r < jobs:
            state["weights"][r] = pool.put(self.flat_weights())
        handles: dict[Any, int] = {}
        for w in range(self.n):
            if plan[w]:
                items = [(t.job, t.coeffs) for t in plan[w]]
                handles[pool.submit(w, r, items, [state["weights"][t.job] for t in plan[w]])] = w
        got = self._collect(r, handles, t0)
        wait_s = pool.clock() - t0
        for w, outs, _ in got:
            for slot, g in enumerate(outs):
                state["results"].setdefault(plan[w][slot].job, {})[(r, w, slot)] = g
        alive = {w for w, _, _ in got} | {w for w in range(self.n) if not plan[w]}
        t1 = pool.clock()
        decoded = code.complete(r, sorted(alive))
        for j in decoded:
            full = decode_job(code, j, state["results"][j])
            state["decoded"][j] = ((full[:-1] / total).float(), float(full[-1]) / total)
        if code.overdue():
            raise RuntimeError(f"{code!r}: jobs {code.overdue()} missed their deadline (a bug)")
        decode_s = pool.clock() - t1
        due = r - T
        applied = None
        if 0 <= due < jobs:
            grad, loss = state["decoded"].pop(due)
            self._apply(grad)
            code.release(due)
            state["results"].pop(due, None)
            state["weights"].pop(due, None)
            applied = due
            self.losses.append(loss)
        rec = StepRecord(r + 1, sorted(set(range(self.n)) - alive), wait_s, decode_s, pool.clock() - t0,
                         applied=applied, decoded=decoded,
                         compute_s=statistics.median([i["compute_s"] for _, _, i in got]) if got else 0.0)
        self._log(rec, {}, r + 1, train_step=None if applied is None else applied + 1)
        return rec

    # -- logging -----------------------------------------------------------------------------------
    def _log(self, rec: StepRecord, extra: dict[str, float], step: int, train_step: int | None = -1) -> None:
        m = {"ps/wait_s": rec.wait_s, "ps/decode_s": rec.decode_s, "ps/num_late": float(len(rec.late)),
             "perf/step_time_s": rec.step_s, "ps/compute_s": rec.compute_s,
             **{f"ps/late/w{w}": 1.0 for w in rec.late}}
        self.records.append(rec)
        if train_step == -1:  # one-shot: everything at the optimizer step
            m.update(extra)
            m["train/lr"] = float(self.scheduler.get_last_lr()[0])
            self.logger.metrics(m, step=step)
            done = step
        else:
            self.logger.metrics(m, step=step)
            if train_step is None:
                return
            self.logger.metrics({"train/loss": self.losses[-1], "train/lr": float(self.scheduler.get_last_lr()[0])},
                                step=train_step)
            done = train_step
        eval_every = self.spec.derived().eval_every
        if done % eval_every == 0 or done == self.train.max_steps:
            self.logger.metrics(self.task.evaluate(self.model, torch.device("cpu"), self.train.eval_batches),
                                step=done)
            self.logger.flush()
        elif done % self.train.log_every == 0:
            self.logger.flush()

    # -- the loop ----------------------------------------------------------------------------------
    def train_model(self) -> nn.Module:
        self.model.train()
        if self.layout.mode == "sequential":
            state: dict[str, Any] = {"weights": {}, "results": {}, "decoded": {}}
            for r in range(self.train.max_steps + self.layout.code.delay):
                self.sequential_round(r, state)
        else:
            for step in range(self.train.max_steps):
                self.one_shot_step(step)
        return self.model

    def save_records(self) -> None:
        if not self.logger.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "steps.jsonl"), "w") as fh:
                for rec in self.records:
                    fh.write(json.dumps(rec.__dict__) + "\n")
            self.logger.artifacts(tmp, "parameter_server")


def run_parameter_server(spec: ExperimentSpec, *, run_id: str, mlflow_uri: str, mlflow_run_id: str) -> None:
    """Entry point from ``workers.entrypoint`` for ``distributed.strategy: parameter_server``."""
    logger = RunLogger(mlflow_uri, mlflow_run_id)
    logger.log_spec(spec.resolved())
    layout = Layout.from_spec(spec)
    pool = RayPool(spec, layout)
    try:
        server = ParameterServer(spec, layout, pool, logger)
        n_params = sum(p.numel() for p in server.model.parameters())
        logger.metrics({"model/params": n_params, "model/trainable_params": server.flat_weights().numel()}, step=0)
        logger.set_tags({"orchestra.world_size": str(layout.n_workers), "orchestra.ps.mode": layout.mode})
        model = server.train_model()
        save_final_model(logger, spec, model)
        server.save_records()
        logger.flush()
        print(f"[orchestra] run {run_id}: parameter server done, {len(server.records)} steps; "
              f"late per step (mean) {sum(len(r.late) for r in server.records) / max(1, len(server.records)):.2f}",
              flush=True)
    finally:
        pool.close()
