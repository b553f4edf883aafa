"""What the workers derive from a spec (``RunPlan``), the cadence's decisions, the settings."""

from __future__ import annotations

from typing import Any

import pytest

from service.spec import ExperimentSpec
from workers.cadence import Cadence
from workers.plan import RunPlan
from workers.settings import WorkerSettings


def plan(train: dict[str, Any] | None = None, optimizer: dict[str, Any] | None = None,
         faults: dict[str, Any] | None = None, **distributed: Any) -> RunPlan:
    return RunPlan.from_spec(ExperimentSpec.model_validate({
        "name": "plan-unit",
        "task": {"kind": "image_classification", "dataset": {"name": "digits"}, "model": {"name": "mlp"}},
        "train": {"max_steps": 10, "batch_size": 16, **(train or {})},
        "optimizer": optimizer or {"name": "sgd", "lr": 0.1},
        "distributed": {"num_workers": 4, **distributed},
        "faults": faults or {},
    }))


def test_cadence_defaults_to_the_end_only() -> None:
    assert plan().cadence == Cadence(max_steps=10, log_every=10, eval_every=10, checkpoint_every=10)
    given = plan({"eval_every": 3, "checkpoint_every": 4, "log_every": 2}).cadence
    assert given == Cadence(max_steps=10, log_every=2, eval_every=3, checkpoint_every=4)
    assert [d for d in range(1, 11) if given.eval(d)] == [3, 6, 9, 10]
    assert [d for d in range(1, 11) if given.checkpoint(d)] == [4, 8, 10]
    assert [d for d in range(1, 11) if given.log(d)] == [2, 4, 6, 8, 10]


MEDIAN = {"name": "median", "f": 1}
SIGN_FLIP = {"byzantine": {"ranks": [1], "attack": "sign_flip"}}


@pytest.mark.parametrize(("distributed", "faults", "want"), [
    ({"strategy": "ddp"}, None, None),
    ({"strategy": "ddp", "aggregator": {"name": "mean"}}, None, None),
    ({"strategy": "ddp", "aggregator": MEDIAN}, None, "gather"),
    ({"strategy": "ddp", "aggregator": MEDIAN, "exchange": "shard"}, None, "shard"),
    ({"strategy": "ddp"}, SIGN_FLIP, "gather"),  # an attack on the plain mean needs the exchange too
    ({"strategy": "ddp"}, {"byzantine": {"ranks": [1], "attack": "label_flip"}}, None),  # lies through data
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 0}, "aggregator": MEDIAN}, None, "shard"),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 0}, "aggregator": MEDIAN, "exchange": "gather"},
     None, "gather"),
    ({"strategy": "parameter_server", "aggregator": MEDIAN}, None, None),  # the server aggregates itself
])
def test_the_exchange_is_decided_once(distributed: dict[str, Any], faults: dict[str, Any] | None,
                                      want: str | None) -> None:
    assert plan(faults=faults, **distributed).exchange == want


def test_zero_stage_is_the_engines() -> None:
    assert plan(strategy="ddp").zero_stage is None
    assert plan(strategy="deepspeed").zero_stage == 2  # the spec's default
    assert plan(strategy="deepspeed", deepspeed={"zero_stage": 3}).zero_stage == 3
    galore = {"name": "galore", "lr": 0.01, "rank": 4}
    assert plan(optimizer=galore, strategy="deepspeed", deepspeed={"zero_stage": 2}).zero_stage == 0  # whole params


def test_default_resources_and_label_flip_ranks() -> None:
    assert plan().resources_per_worker == {"CPU": 1.0}
    assert plan(use_gpu=True).resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert plan(resources_per_worker={"CPU": 2.0}).resources_per_worker == {"CPU": 2.0}
    assert plan(faults={"byzantine": {"ranks": [2], "attack": "label_flip"}}).label_flip_ranks == {2}
    assert plan(faults=SIGN_FLIP).label_flip_ranks == frozenset()


def test_settings_from_the_environment() -> None:
    assert WorkerSettings.from_env({}) == WorkerSettings(storage_path=WorkerSettings.from_env({}).storage_path)
    assert WorkerSettings.from_env({}).storage_path.endswith(".orchestra/ray_results")
    assert "~" not in WorkerSettings.from_env({}).storage_path
    env = {"MLFLOW_TRACKING_URI": "http://m", "ORCHESTRA_MLFLOW_RUN_ID": "r1", "ORCHESTRA_STORAGE_PATH": "/s",
           "RAY_ADDRESS": "10.0.0.1:6379", "ORCHESTRA_KILL_GRACE_S": "0.5"}
    assert WorkerSettings.from_env(env) == WorkerSettings("http://m", "r1", "/s", "10.0.0.1:6379", 0.5)


def test_the_driver_exits_when_the_cluster_is_gone_and_stays_while_it_answers() -> None:
    """The watchdog (a process of its own: it ends the process) against a port nobody listens
    on, and against a listening one."""
    import socket
    import subprocess
    import sys
    import time

    from workers.watchdog import gcs_endpoint

    assert gcs_endpoint("127.0.0.1:6380") == ("127.0.0.1", 6380)
    assert gcs_endpoint("auto") is None and gcs_endpoint("http://127.0.0.1:8265") is None
    code = ("import sys, time; from workers.watchdog import watch; "
            "watch(sys.argv[1], lost_after_s=1.0, interval_s=0.2); time.sleep(20); sys.exit(0)")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connections refused
        t0 = time.monotonic()
        gone = subprocess.run([sys.executable, "-c", code, dead], capture_output=True, text=True, timeout=30)
        assert gone.returncode == 75 and time.monotonic() - t0 < 15
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen(16)
        proc = subprocess.Popen([sys.executable, "-c", code, f"127.0.0.1:{live.getsockname()[1]}"])
        time.sleep(4)
        assert proc.poll() is None  # the cluster answers: the driver stays
        proc.kill()
        proc.wait()
