"""The parameter server's loop: one-shot steps (uncoded or a one-shot code) and sequential rounds,
the robust rule and the liars shared with the ranks' exchange (``workers.robust``), logging and
evaluation on the training loop's cadence (``workers.cadence``)."""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.spec import ExperimentSpec
from workers.mlflow_log import RunLogger
from workers.model_io import save_final_model
from workers.optim import build_optimizer
from workers.parameter_server.layout import Layout
from workers.parameter_server.pools import LocalPool, Pool, RayPool
from workers.plan import RunPlan
from workers.robust import Liars, build_rule
from workers.schedule import build_scheduler
from workers.tasks import build_task

log = logging.getLogger(__name__)


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
            rule = build_rule(spec)
        self.rule = rule
        self.liars = Liars(spec, self.n)
        self.cadence = RunPlan.from_spec(spec).cadence
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
        byz = self.liars.among(workers)  # positions in workers
        honest = [w for i, w in enumerate(workers) if i not in byz]
        if self.rule is not None:  # robust: the rule sees per-worker mean-gradient estimates
            mass = {w: lay.samples(lay.one_shot_items(w, step)[0][1]) for w in workers}
            rows = self.liars.replace(torch.stack([arrived[w][:-1].float() / mass[w] for w in workers]), byz, step)
            grad = self.rule(rows)
            if byz:
                from algorithms.aggregation.base import liar_weight

                extra["exchange/liar_weight"] = float(liar_weight(rows, grad, byz))
            loss = sum(float(arrived[w][-1]) / mass[w] for w in honest) / max(1, len(honest))
            return grad, loss, extra
        msgs = dict(arrived)
        if byz:  # liars replace their coded message, computed from the honest ones
            lied = self.liars.replace(torch.stack([arrived[w] for w in workers]).float(), byz, step)
            for i in byz:
                msgs[workers[i]] = lied[i].to(arrived[workers[i]].dtype)
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
        if self.cadence.eval(done):
            self.logger.metrics(self.task.evaluate(self.model, torch.device("cpu"), self.train.eval_batches),
                                step=done)
            self.logger.flush()
        elif self.cadence.log(done):
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
    pool: LocalPool | RayPool = LocalPool(spec, layout) if spec.distributed.placement == "in_process" \
        else RayPool(spec, layout)
    try:
        server = ParameterServer(spec, layout, pool, logger)
        n_params = sum(p.numel() for p in server.model.parameters())
        # the load: the largest fraction of a step's data one worker computes per round (the papers')
        load = float(layout.code.load) if layout.code is not None else 1.0 / layout.n_workers
        logger.metrics({"model/params": n_params, "model/trainable_params": server.flat_weights().numel(),
                        "ps/load": load}, step=0)
        logger.set_tags({"orchestra.world_size": str(layout.n_workers), "orchestra.ps.mode": layout.mode})
        model = server.train_model()
        save_final_model(logger, spec, model)
        server.save_records()
        logger.flush(wait=True)
        log.info("run %s: parameter server done, %d steps; late per step (mean) %.2f", run_id, len(server.records),
                 sum(len(r.late) for r in server.records) / max(1, len(server.records)))
    finally:
        pool.close()
