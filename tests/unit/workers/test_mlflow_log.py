"""Rank 0's MLflow logger while the server is away: training is not held up, metrics are kept
(in memory, then spilled to disk), sent once and in order when the server answers, and the run
fails with the reason once the outage passes its limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from workers.mlflow_log import MlflowUnavailable, RunLogger


class FakeServer:
    """MlflowClient's calls the logger makes; ``down`` makes every call fail as a dead server does."""

    def __init__(self) -> None:
        self.down = False
        self.refuse: MlflowException | None = None
        self.metrics: list[tuple[str, int, float]] = []
        self.calls = 0
        self.terminated: str | None = None

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise requests.exceptions.ConnectionError("Connection refused")
        if self.refuse is not None:
            raise self.refuse

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = ()) -> None:
        self._check()
        self.metrics += [(m.key, m.step, m.value) for m in metrics]

    def set_terminated(self, run_id: str, status: str) -> None:
        self._check()
        self.terminated = status


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make(server: FakeServer, clock: Clock, **kw: Any) -> RunLogger:
    # built disabled (no MlflowClient, which would open a default store in the working directory),
    # then pointed at the fake server
    logger = RunLogger("", "run1", enabled=False, outage_limit_s=60.0, clock=clock, sleep=clock.sleep, **kw)
    logger.enabled, logger.client = True, server  # type: ignore[assignment]
    return logger


def test_an_outage_holds_nothing_up_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server, clock = FakeServer(), Clock()
    logger = make(server, clock, memory_limit=25)
    expected = []
    for step in range(1, 31):
        logger.metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        expected += [("train/loss", step, 1.0 / step), ("train/lr", step, 0.1)]
        if step == 5:
            logger.flush()
            assert len(server.metrics) == 10
            server.down = True
        if step % 5 == 0 and step > 5:
            calls, now = server.calls, clock.now
            logger.flush()  # returns at once: one attempt, no waiting
            assert server.calls == calls + 1 and clock.now == now
        clock.now += 1.0
    spilled = list(tmp_path.glob("orchestra-metrics-run1-*.jsonl"))
    assert len(spilled) == 1 and len(spilled[0].read_text().splitlines()) > 25  # beyond memory: on disk
    server.down = False
    logger.flush()
    assert server.metrics == expected  # every metric once, in the order logged
    assert not list(tmp_path.glob("orchestra-metrics-*"))


def test_the_last_flush_waits_for_the_server_and_a_long_outage_fails_the_run() -> None:
    server, clock = FakeServer(), Clock()
    logger = make(server, clock)
    logger.metrics({"train/loss": 0.5}, step=1)
    server.down = True

    def back_after(seconds: float) -> None:
        clock.now += seconds
        if clock.now >= 20:
            server.down = False

    logger.sleep = back_after
    logger.finish("FINISHED")
    assert server.metrics == [("train/loss", 1, 0.5)] and server.terminated == "FINISHED"
    assert 20 <= clock.now < 30

    logger.metrics({"train/loss": 0.4}, step=2)
    server.down = True
    logger.sleep = clock.sleep
    with pytest.raises(MlflowUnavailable, match=r"did not answer for 6\d s \(limit 60 s\)"):
        logger.flush(wait=True)


def test_a_request_mlflow_refuses_is_not_waited_for() -> None:
    server, clock = FakeServer(), Clock()
    logger = make(server, clock)
    logger.metrics({"train/loss": float("nan")}, step=1)
    server.refuse = MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)
    with pytest.raises(MlflowException, match="bad metric"):
        logger.flush()
    assert clock.now == 0.0
