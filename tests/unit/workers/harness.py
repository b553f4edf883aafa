"""Ray Train's surface and the MLflow logger as in-process stand-ins, so that the real
``train_worker`` runs in a test process (or in processes spawned with torch.multiprocessing).

Checkpoints reported to the fake Ray are copied to ``<out>/checkpoints/step<N>``; what the logger
would upload as artifacts is copied to ``<out>/<mlflow_run_id>/``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from service.spec import ExperimentSpec


class Checkpoint:
    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def from_directory(cls, path: str) -> Checkpoint:
        return cls(path)

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


class FakeRay:
    """``ray``, ``ray.train`` and ``ray.train.torch`` for one worker of ``world``."""

    def __init__(self, out: Path, *, rank: int = 0, world: int = 1, restore_from: Path | None = None) -> None:
        self.out, self.rank, self.world = out, rank, world
        self.restore_from = restore_from
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, self.out / "checkpoints" / f"step{metrics['step']}", dirs_exist_ok=True)

    def modules(self) -> dict[str, types.ModuleType]:
        ray, train, rt = (types.ModuleType(n) for n in ("ray", "ray.train", "ray.train.torch"))
        ctx = types.SimpleNamespace(get_world_rank=lambda: self.rank, get_world_size=lambda: self.world)
        train.get_context = lambda: ctx  # type: ignore[attr-defined]
        train.get_checkpoint = lambda: (  # type: ignore[attr-defined]
            Checkpoint(str(self.restore_from)) if self.restore_from else None)
        train.report = self.report  # type: ignore[attr-defined]
        train.Checkpoint = Checkpoint  # type: ignore[attr-defined]
        rt.get_device = lambda: torch.device("cpu")  # type: ignore[attr-defined]
        train.torch = rt  # type: ignore[attr-defined]
        ray.train = train  # type: ignore[attr-defined]
        return {"ray": ray, "ray.train": train, "ray.train.torch": rt}


class RecordingLogger:
    """RunLogger's interface: keeps metrics (rank 0's) and copies artifacts under ``out/run_id``."""

    def __init__(self, out: Path, run_id: str, enabled: bool) -> None:
        self.out, self.enabled = out / run_id, enabled
        self.metric_log: dict[str, list[tuple[int, float]]] = {}

    def log_spec(self, resolved: dict[str, Any]) -> None:
        assert self.enabled

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                self.metric_log.setdefault(k, []).append((step, float(v)))

    def flush(self, *, wait: bool = False) -> None:
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        return None

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        assert self.enabled
        shutil.copytree(local_dir, self.out / artifact_path)

    def steps(self, key: str) -> list[int]:
        return [s for s, _ in self.metric_log.get(key, [])]


def run_worker(spec: ExperimentSpec, out: Path, *, run_id: str = "run", rank: int = 0, world: int = 1,
               restore_from: Path | None = None, report_eval: bool = False) -> tuple[RecordingLogger, FakeRay]:
    """The real train_worker with the fakes installed (and removed again)."""
    from workers import train_loop

    fake = FakeRay(out, rank=rank, world=world, restore_from=restore_from)
    loggers: list[RecordingLogger] = []

    def make_logger(uri: str, mlflow_run_id: str, *, enabled: bool = True) -> RecordingLogger:
        loggers.append(RecordingLogger(out, mlflow_run_id, enabled))
        return loggers[-1]

    saved_modules = {k: sys.modules.get(k) for k in ("ray", "ray.train", "ray.train.torch")}
    saved_logger = train_loop.RunLogger
    sys.modules.update(fake.modules())
    train_loop.RunLogger = make_logger  # type: ignore[assignment,misc]
    try:
        train_loop.train_worker({"spec": spec, "mlflow_uri": "", "mlflow_run_id": run_id,
                                 "report_eval": report_eval})
    finally:
        train_loop.RunLogger = saved_logger  # type: ignore[misc]
        for k, mod in saved_modules.items():
            if mod is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = mod
    return loggers[0], fake


def final_state(out: Path, run_id: str = "run") -> dict[str, torch.Tensor]:
    return torch.load(out / run_id / "model" / "state_dict.pt", weights_only=True)  # type: ignore[no-any-return]


class RankFailed(str):
    """What a rank of ``run_ranks`` reports instead of its result when its body raised."""


def run_ranks(body: Callable[..., Any], world: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """``body(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group (RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, one torch thread each); returns what each rank's
    body returned (it must pickle), in rank order. ``body`` is a module-level function. A rank
    whose body raises reports the error at once (the others may be stuck in a collective) and the
    call fails naming the rank; every process is gone when it returns."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(body, rank, world, port, queue, args)) for rank in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < world:
            rank, result = queue.get(timeout=timeout_s)
            assert not isinstance(result, RankFailed), f"rank {rank}: {result}"
            got[rank] = result
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0, p.exitcode
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return [got[rank] for rank in range(world)]


def _rank_main(body: Callable[..., Any], rank: int, world: int, port: int, queue: Any, args: tuple[Any, ...]) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = body(rank, world, *args)
    except BaseException as exc:
        queue.put((rank, RankFailed(repr(exc))))
        raise
    finally:
        dist.destroy_process_group()
    queue.put((rank, result))
