"""Fault injection from the spec's ``faults`` section, seeded so that every rank agrees on it."""

import logging
import os
import random
import time

import torch

from service.spec.faults import ByzantineSpec, DelaySpec, FaultsSpec, StragglerSpec

log = logging.getLogger(__name__)


def chosen_ranks(section: ByzantineSpec | StragglerSpec | None, n: int) -> list[int]:
    """The ranks a fault applies to: given ones, or ``count`` drawn with the section's seed."""
    if section is None:
        return []
    if section.ranks is not None:
        return sorted(section.ranks)
    rng = random.Random(section.seed)
    return sorted(rng.sample(range(n), section.count or 0))


def sample_delay_s(delay: DelaySpec, rng: random.Random) -> float:
    mean = delay.mean_ms / 1000.0
    if delay.dist == "fixed":
        return mean
    if delay.dist == "exponential":
        return rng.expovariate(1.0 / mean)
    # Pareto with shape alpha and mean `mean`: scale x_m = mean (alpha - 1) / alpha.
    scale = mean * (delay.alpha - 1.0) / delay.alpha
    return scale * rng.paretovariate(delay.alpha)


class Straggler:
    """The straggler delays of one rank: on the chosen ranks every round, or, with bursts, on the
    rounds where the seeded bursty pattern picks this rank (the round the caller names, else
    counted by calls). Sleeps in :meth:`delay`; :meth:`draw` only says how long (a simulated
    clock)."""

    def __init__(self, faults: FaultsSpec, rank: int, n: int) -> None:
        self.spec = faults.stragglers
        self.rank, self.n, self.round = rank, n, 0
        self.active = rank in chosen_ranks(self.spec, n)
        self.rng = random.Random((self.spec.seed if self.spec else 0) * 7919 + rank)
        self.pattern: list[frozenset[int]] = []

    def _straggles(self) -> bool:
        spec = self.spec
        if spec is None or spec.bursts is None:
            return self.active
        while self.round >= len(self.pattern):  # the pattern is replayed from its seed, longer each time
            from algorithms.coding.straggler_model import bursty_pattern

            b = spec.bursts
            self.pattern = bursty_pattern(self.n, max(2 * len(self.pattern), 256), b.burst, b.window, spec.count or 0,
                                          p_start=b.p_start, p_continue=b.p_continue, seed=spec.seed)
        return self.rank in self.pattern[self.round]

    def draw(self, round: int | None = None) -> float:
        """This round's delay in seconds (0 when this rank does not straggle); advances the round."""
        if round is not None:
            self.round = round
        straggles = self._straggles()
        self.round += 1
        if not straggles or self.spec is None:
            return 0.0
        return sample_delay_s(self.spec.delay, self.rng)

    def delay(self, round: int | None = None) -> float:
        seconds = self.draw(round)
        if seconds > 0:
            time.sleep(seconds)
        return seconds


def maybe_kill(faults: FaultsSpec, *, rank: int, step: int, restored: bool) -> None:
    """Kill this worker process at ``faults.kill.step`` on the first attempt (not after a restore)."""
    kill = faults.kill
    if kill is not None and not restored and rank == kill.rank and step == kill.step:
        from workers.settings import settings

        # Ray Train's controller collects reported checkpoints when it polls the workers: a crash
        # within the same poll as the last checkpoint would lose it (see WorkerSettings.kill_grace_s).
        time.sleep(settings().kill_grace_s)
        log.warning("fault injection: killing rank %d at step %d", rank, step)
        os._exit(17)


SIMULATED = {  # what each kind looks like in a job's log (service.failures reads it back)
    "oom": "torch.OutOfMemoryError: CUDA out of memory",
    "nccl": "NCCL error: unhandled system error",
    "node_lost": "NodeDiedError: the node running this worker died",
    "preempted": "the node was preempted (drained)",
    "user_error": "ValueError: the user's code raised",
}


class SimulatedFailure(RuntimeError):
    """A failure injected by ``faults.fail_job``."""


def maybe_fail_job(faults: FaultsSpec, *, rank: int, attempt: int) -> None:
    """After a checkpoint: fail this attempt's job with ``faults.fail_job.kind`` on its first
    ``attempts`` attempts (rank 0 raises; Ray Train ends the job)."""
    fail = faults.fail_job
    if fail is not None and rank == 0 and attempt <= fail.attempts:
        from workers.settings import settings

        time.sleep(settings().kill_grace_s)  # the checkpoint reaches Ray Train's controller first
        log.warning("fault injection: failing attempt %d with %s", attempt, fail.kind)
        raise SimulatedFailure(f"{SIMULATED[fail.kind]} (simulated by faults.fail_job on attempt {attempt})")


def attack_generator(byz: ByzantineSpec | None, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(((byz.seed if byz else 0) + 1) * 1_000_003 + step)
