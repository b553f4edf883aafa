"""When a training loop logs, evaluates and checkpoints, and what it logs about throughput.

Shared by the Ray Train loop (``workers.train_loop``) and the parameter server, so that both log
and evaluate on the same steps. The periods themselves are derived once, in ``workers.plan``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cadence:
    """Every period is in optimizer steps; the last step always logs, evaluates and checkpoints."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    def log(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.max_steps

    def eval(self, done: int) -> bool:
        return done % self.eval_every == 0 or done == self.max_steps

    def checkpoint(self, done: int) -> bool:
        return done % self.checkpoint_every == 0 or done == self.max_steps


class Window:
    """Mean training loss and throughput over the steps since the last log line."""

    def __init__(self, batch_size: int, tokens_per_sample: int | None, device: torch.device) -> None:
        self.batch_size, self.tokens_per_sample, self.device = batch_size, tokens_per_sample, device
        self.t0, self.steps, self.loss = time.perf_counter(), 0, 0.0

    def add(self, loss: float) -> None:
        self.steps += 1
        self.loss += loss

    def metrics(self, lr: float) -> dict[str, float]:
        """``train/*`` and ``perf/*`` of the window; starts the next window."""
        elapsed = time.perf_counter() - self.t0
        steps = max(1, self.steps)
        samples_per_s = self.steps * self.batch_size / max(elapsed, 1e-9)
        out = {"train/loss": self.loss / steps, "train/lr": lr,
               "perf/samples_per_s": samples_per_s, "perf/step_time_s": elapsed / steps}
        if self.tokens_per_sample:
            out["perf/tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.device.type == "cuda":
            out["perf/max_mem_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.t0, self.steps, self.loss = time.perf_counter(), 0, 0.0
        return out
