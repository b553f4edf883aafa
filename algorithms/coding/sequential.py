"""Round-based sequential gradient codes: Krishnan, Ebrahimi and Khisti, "Sequential Gradient
Coding for Straggler Mitigation" (ICLR 2023).

Job ``t`` (the gradient ``g(t)``, split into parts) starts in round ``t`` and must be decodable by
the end of round ``t + T``. In each round the server calls :meth:`assign` (a list of
:class:`Task` per worker), the workers compute, and the server calls :meth:`complete` with the
workers whose results arrived in time; the code then plans the next rounds (which tasks to
repeat) from the straggler pattern seen so far. Decoding is generic: a job is decodable when
the coefficient vectors of its received results span the all-ones vector (least squares,
:mod:`algorithms.coding.linalg`), so we never trust a hand-written decoding rule.

This module holds the shared bookkeeping and the first scheme of the paper (Sec. 3.1,
"selective repetition", SR-SGC); :mod:`algorithms.coding.multiplexed` holds the second (M-SGC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from algorithms.coding.base import Task, TaskKey, UndecodableError
from algorithms.coding.linalg import solve_decoding
from algorithms.coding.repetition import CyclicRepetition, FractionalRepetition, LinearGradientCode
from algorithms.coding.straggler_model import window_ok


def base_code(n: int, s: int) -> LinearGradientCode:
    """The one-shot code a sequential scheme uses inside a round: fractional repetition when
    ``s + 1`` divides ``n`` (0/1 weights, perfectly conditioned), cyclic repetition otherwise;
    both give every worker exactly ``s + 1`` parts, which the schemes' loads assume."""
    if n % (s + 1) == 0:
        return FractionalRepetition(n, s)
    return CyclicRepetition(n, s)


def coded_task(job: int, row: torch.Tensor, offset: int, kind: str = "coded") -> Task:
    nz = torch.nonzero(row).flatten().tolist()
    return Task(job=job, coeffs=tuple((offset + int(j), float(row[j])) for j in nz), kind=kind)


class RoundBasedCode:
    """Bookkeeping shared by the sequential schemes (rounds, received results, decoding)."""

    def __init__(self, n_workers: int, burst: int, window: int, lam: int, delay: int,
                 n_jobs: int | None) -> None:
        if not 0 <= lam < n_workers:
            raise ValueError(f"need 0 <= lambda < n_workers, got lambda={lam}, n={n_workers}")
        if not 1 <= burst < window:
            raise ValueError(f"need 1 <= B < W, got B={burst}, W={window}")
        self.n_workers = n_workers
        self.burst, self.window, self.lam = burst, window, lam
        self.delay = delay
        self.n_jobs = n_jobs
        self.pattern: list[frozenset[int]] = []
        self.decoded_at: dict[int, int] = {}
        self._assigned: dict[int, list[list[Task]]] = {}
        self._received: dict[int, list[tuple[TaskKey, Task]]] = {}
        self._next_round = 0
        self._peak_load = 0.0  # heaviest round assigned so far
        self._steady_load: float | None = None

    # -- to be provided by a scheme -------------------------------------------------------
    @property
    def n_parts(self) -> int:
        raise NotImplementedError

    @property
    def part_fractions(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _plan(self, round: int) -> list[list[Task]]:
        raise NotImplementedError

    def _fresh(self) -> RoundBasedCode:
        """A new instance with the same (n, B, W, lambda) and no job limit (for :attr:`load`)."""
        raise NotImplementedError

    def _after_round(self, round: int, alive: set[int]) -> None:
        """Hook: update the scheme's state once the round's survivors are known."""

    # -- the round protocol ---------------------------------------------------------------
    def job_active(self, job: int) -> bool:
        return job >= 0 and (self.n_jobs is None or job < self.n_jobs)

    def deadline(self, job: int) -> int:
        return job + self.delay

    def assign(self, round: int) -> list[list[Task]]:
        if round in self._assigned:
            return self._assigned[round]
        if round != self._next_round:
            raise ValueError(f"assign({round}) out of order: round {self._next_round} is next")
        tasks = self._plan(round)
        self._assigned[round] = tasks
        self._peak_load = max(self._peak_load, self._tasks_load(tasks))
        return tasks

    def complete(self, round: int, alive: Sequence[int]) -> list[int]:
        touched = self._record(round, alive)
        new = [j for j in sorted(touched) if j not in self.decoded_at and self._try_decode(j)]
        for j in new:
            self.decoded_at[j] = round
        return new

    def _record(self, round: int, alive: Sequence[int]) -> set[int]:
        """The bookkeeping half of :meth:`complete` (no decoding); returns the jobs touched."""
        if round != self._next_round or round not in self._assigned:
            raise ValueError(f"complete({round}) out of order: assign round {self._next_round} first")
        alive_set = set(int(w) for w in alive)
        self.pattern.append(frozenset(set(range(self.n_workers)) - alive_set))
        touched: set[int] = set()
        for w in sorted(alive_set):
            for slot, task in enumerate(self._assigned[round][w]):
                self._received.setdefault(task.job, []).append(((round, w, slot), task))
                touched.add(task.job)
        self._after_round(round, alive_set)
        self._next_round += 1
        for old in [r for r in self._assigned if r < round]:  # planning never looks back further
            del self._assigned[old]
        return touched

    def conforms(self, round: int, stragglers: Sequence[int]) -> bool:
        if round != self._next_round:
            raise ValueError(f"conforms({round}): round {self._next_round} is the open one")
        tail = self.pattern[max(0, len(self.pattern) - self.window + 1):]
        return window_ok([*tail, frozenset(stragglers)], self.burst, self.window, self.lam)

    def release(self, job: int) -> None:
        """Forget what was kept to decode ``job`` (call once its gradient was used and its
        deadline round has completed); keeps memory flat over a long run."""
        if self._next_round <= self.deadline(job):
            raise ValueError(f"release({job}) before its deadline round {self.deadline(job)} completed")
        self._received.pop(job, None)

    def overdue(self) -> list[int]:
        """Jobs whose deadline has passed (rounds completed) without becoming decodable."""
        done = self._next_round - 1
        last = done - self.delay
        return [j for j in range(0, last + 1) if self.job_active(j) and j not in self.decoded_at]

    # -- decoding -------------------------------------------------------------------------
    def _rows(self, job: int) -> tuple[list[TaskKey], torch.Tensor]:
        got = self._received.get(job, [])
        at = [(r, p, c) for r, (_, task) in enumerate(got) for p, c in task.coeffs]
        rows = torch.zeros(len(got), self.n_parts, dtype=torch.float64)
        if at:  # one scatter: a Python loop of tensor writes dominated long runs
            r_idx, p_idx, vals = zip(*at, strict=True)
            rows.index_put_((torch.tensor(r_idx), torch.tensor(p_idx)),
                            torch.tensor(vals, dtype=torch.float64), accumulate=True)
        return [k for k, _ in got], rows

    def _try_decode(self, job: int) -> bool:
        try:
            self.job_weights(job)
        except UndecodableError:
            return False
        return True

    def decodable(self, job: int) -> bool:
        return job in self.decoded_at

    def job_weights(self, job: int) -> dict[TaskKey, float]:
        keys, rows = self._rows(job)
        if not keys:
            raise UndecodableError(f"job {job}: nothing received")
        weights = solve_decoding(rows)
        return {k: float(w) for k, w in zip(keys, weights, strict=True) if abs(float(w)) > 0.0}

    # -- computational load ---------------------------------------------------------------
    def _tasks_load(self, tasks: list[list[Task]]) -> float:
        frac = self.part_fractions
        return max((sum(frac[p] for t in mine for p in t.parts) for mine in tasks), default=0.0)

    def round_load(self, round: int) -> float:
        """Largest fraction of one job's data that a worker processes in ``round``."""
        return self._tasks_load(self.assign(round))

    @property
    def load(self) -> float:
        """Normalised computational load, measured on the task assignment (not the paper's
        formula, which the tests compare it with): the largest fraction of one job's data that a
        worker processes in one round, over the rounds assigned so far and over the rounds
        ``0 .. T`` of a straggler-free run of the same scheme (round ``T`` is the first in which
        every slot is busy), so it is defined before the first round and shows any round that a
        straggler pattern made heavier."""
        if self._steady_load is None:
            probe = self._fresh()
            everyone = list(range(self.n_workers))
            for r in range(self.delay + 1):  # the plan needs no decoding: record only
                probe.assign(r)
                probe._record(r, everyone)
            self._steady_load = probe._peak_load
        return max(self._steady_load, self._peak_load)


class SelectiveRepeatSGC(RoundBasedCode):
    """SR-SGC (Sec. 3.1): GC tolerating ``s = ceil(B * lambda / (W - 1 + B))`` stragglers in
    every round, plus selective repetition: when job ``t`` misses ``v > s`` results, ``v - s`` of
    the workers that missed it recompute their job-``t`` task in round ``t + B`` instead of
    job ``t + B``'s task. ``T = B``; normalised load ``(s + 1) / n``. The paper states it for
    ``W - 1`` a multiple of ``B``.

    Choice of repeaters (the paper leaves it open): workers that straggled in round ``t`` first
    (by the model they cannot straggle again ``B`` rounds later), then those that missed ``t``
    because they were themselves repeating, most recent straggler first.
    """

    def __init__(self, n_workers: int, burst: int, window: int, lam: int,
                 n_jobs: int | None = None) -> None:
        super().__init__(n_workers, burst, window, lam, delay=burst, n_jobs=n_jobs)
        if (window - 1) % burst:
            raise ValueError(f"sequential_gc needs W - 1 ({window - 1}) divisible by B ({burst})")
        self.s = math.ceil(burst * lam / (window - 1 + burst))
        self.code = base_code(n_workers, self.s)
        self._repeat: dict[int, dict[int, int]] = {}  # round -> worker -> job to repeat
        self._last_straggle: dict[int, int] = {}

    @property
    def n_parts(self) -> int:
        return self.code.n_parts

    @property
    def part_fractions(self) -> tuple[float, ...]:
        return tuple([1.0 / self.n_parts] * self.n_parts)

    def _fresh(self) -> SelectiveRepeatSGC:
        return SelectiveRepeatSGC(self.n_workers, self.burst, self.window, self.lam)

    def _plan(self, round: int) -> list[list[Task]]:
        repeats = self._repeat.get(round, {})
        out: list[list[Task]] = []
        for w in range(self.n_workers):
            if w in repeats:
                out.append([coded_task(repeats[w], self.code.B[w], 0, kind="repeat")])
            elif self.job_active(round):
                out.append([coded_task(round, self.code.B[w], 0)])
            else:
                out.append([])
        return out

    def _after_round(self, round: int, alive: set[int]) -> None:
        stragglers = set(range(self.n_workers)) - alive
        for w in stragglers:
            self._last_straggle[w] = round
        if not self.job_active(round):
            return
        tasks = self._assigned[round]
        missed = [w for w in range(self.n_workers) if w in stragglers or tasks[w][0].job != round]
        extra = len(missed) - self.s
        if extra <= 0:
            return
        order = sorted(missed, key=lambda w: (w not in stragglers, -self._last_straggle.get(w, -1), w))
        self._repeat[round + self.burst] = {w: round for w in order[:extra]}
