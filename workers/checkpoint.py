"""Checkpoints through Ray Train: model, optimizer, schedule and step in one directory."""

import os
import tempfile
from typing import Any

import torch
from torch import nn

STATE_FILE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def save_and_report(*, model: nn.Module, optimizer: Any, scheduler: Any, step: int,
                    metrics: dict[str, float], rank: int) -> None:
    """Every rank calls this (Ray Train needs a report from each); rank 0 writes the state."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step}, os.path.join(tmp, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)


def restore(*, model: nn.Module, optimizer: Any, scheduler: Any) -> int:
    """Load the last reported checkpoint, if any; returns the step to resume from (0 if none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
