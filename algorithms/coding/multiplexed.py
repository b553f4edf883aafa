"""M-SGC, the multiplexed scheme of Krishnan, Ebrahimi and Khisti, "Sequential Gradient Coding
for Straggler Mitigation" (ICLR 2023, Sec. 3.2), for the (B, W, lambda)-bursty model.

Each job's data is split in two. ``D1`` holds ``n (W - 1)`` uncoded pieces, ``W - 1`` per worker;
``D2`` holds ``B`` groups of ``n`` pieces, each group protected by a GC that tolerates ``lambda``
stragglers. Job ``t`` owns one "slot" of every worker in each of rounds ``t .. t + W - 2 + B``
(so ``T = W - 2 + B`` and every worker runs ``W - 1 + B`` mini-tasks per round, one per live job):

* slots ``0 .. W - 2``: the worker computes its next unfinished D1 piece;
* slot ``W - 1 + g`` (``g < B``): if the worker still has unfinished D1 pieces (it straggled
  earlier), it repeats the next one -- this is the adaptation to past straggler patterns --
  otherwise it computes its coded task of D2 group ``g``.

Piece sizes equalise the mini-tasks: a D1 piece is ``lambda + 1`` times a D2 piece, so the
normalised load per round is ``(lambda+1)(W-1+B) / (n (B + (W-1)(lambda+1)))`` versus
``(lambda+1)/n`` for GC that tolerates ``lambda`` stragglers per round (paper, Theorem 2 /
Eq. for M-SGC); that holds only because the GC gives each worker exactly ``lambda + 1`` pieces,
so a coded mini-task is as large as a D1 one. ``load`` measures it from the tasks.

Why it meets the deadline under the model: a worker's straggles in slots ``0 .. W-2`` lie in
one burst, and its next burst starts at least ``W`` rounds after that
burst's last round, so its ``W - 1`` D1 pieces finish by slot ``W + B - 2``; a worker missing
from group ``g`` straggled inside the ``W`` rounds ``t + g .. t + W - 1 + g``, so at most
``lambda`` workers miss each group.
"""

from __future__ import annotations

from algorithms.coding.base import Task
from algorithms.coding.sequential import RoundBasedCode, base_code, coded_task


class MultiplexedSGC(RoundBasedCode):
    def __init__(self, n_workers: int, burst: int, window: int, lam: int,
                 n_jobs: int | None = None) -> None:
        super().__init__(n_workers, burst, window, lam, delay=window - 2 + burst, n_jobs=n_jobs)
        self.code = base_code(n_workers, lam)  # GC of each D2 group
        self.d1_per_worker = window - 1
        self._d1_done: dict[int, list[int]] = {}  # job -> D1 pieces finished per worker
        self.minitasks = window - 1 + burst

    @property
    def n_parts(self) -> int:
        return self.n_workers * self.d1_per_worker + self.burst * self.code.n_parts

    @property
    def part_fractions(self) -> tuple[float, ...]:
        n, lam = self.n_workers, self.lam
        v = 1.0 / (n * (self.burst + self.d1_per_worker * (lam + 1)))  # a D2 piece
        d1 = [(lam + 1) * v] * (n * self.d1_per_worker)
        return tuple(d1 + [v] * (self.burst * self.code.n_parts))

    def _fresh(self) -> MultiplexedSGC:
        return MultiplexedSGC(self.n_workers, self.burst, self.window, self.lam)

    def _d1_task(self, job: int, worker: int, kind: str) -> Task:
        piece = worker * self.d1_per_worker + self._d1_done[job][worker]
        return Task(job=job, coeffs=((piece, 1.0),), kind=kind)

    def _plan(self, round: int) -> list[list[Task]]:
        out: list[list[Task]] = [[] for _ in range(self.n_workers)]
        for m in range(self.minitasks):
            job = round - m
            if not self.job_active(job):
                continue
            done = self._d1_done.setdefault(job, [0] * self.n_workers)
            for w in range(self.n_workers):
                if m < self.d1_per_worker:
                    out[w].append(self._d1_task(job, w, "uncoded"))
                elif done[w] < self.d1_per_worker:
                    out[w].append(self._d1_task(job, w, "repeat"))
                else:
                    g = m - self.d1_per_worker
                    offset = self.n_workers * self.d1_per_worker + g * self.code.n_parts
                    out[w].append(coded_task(job, self.code.B[w], offset))
        return out

    def release(self, job: int) -> None:
        super().release(job)
        self._d1_done.pop(job, None)

    def _after_round(self, round: int, alive: set[int]) -> None:
        for w in alive:
            for task in self._assigned[round][w]:
                if task.kind in ("uncoded", "repeat"):
                    self._d1_done[task.job][w] += 1
