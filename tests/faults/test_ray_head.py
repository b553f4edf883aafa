"""The Ray head killed mid-run (its GCS, raylet, dashboard and workers; the job's driver is left,
as when a head node dies): the run leaves ``running`` within the configured bound and fails with
the reason, the driver exits instead of living on as an orphan, the API keeps answering, and once
a head is back a queued run dispatches and succeeds."""

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.stack import Stack, free_port
from tests.conftest import ApiProcess, small_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOST_AFTER_S = 8
DRIVER_EXIT_S = 5


def pids(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_ray_head_killed_mid_run(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.db import upgrade

    monkeypatch.setenv("ORCHESTRA_RAY_LOST_EXIT_S", str(DRIVER_EXIT_S))  # the head passes it on to drivers
    stack = Stack(home=tmp_path / "stack", dashboard_port=free_port(38365), gcs_port=free_port(36480),
                  mlflow_port=free_port(35100), num_cpus=4)
    stack.start()
    api = None
    try:
        stack.wait_ready()
        upgrade(postgres_url)
        port = free_port(28500)
        env = {**os.environ, **stack.env(), "ORCHESTRA_DATABASE_URL": postgres_url, "ORCHESTRA_HOME": str(tmp_path),
               "ORCHESTRA_STORAGE_PATH": str(tmp_path / "ray_results"), "ORCHESTRA_RAY_LOST_AFTER_S": str(LOST_AFTER_S),
               "ORCHESTRA_RECONCILER_INTERVAL_S": "0.5", "ORCHESTRA_SCHEDULER_INTERVAL_S": "0.5",
               "ORCHESTRA_CONTROL_MAX_BACKOFF_S": "2"}
        api = ApiProcess(url=f"http://127.0.0.1:{port}", env=env, port=port)
        api.start()
        client = httpx.Client(base_url=api.url, timeout=30)
        exp = client.post("/v1/experiments", json=small_spec("fault-ray", max_steps=1_000_000)).json()
        wait_for(client, exp["id"], {"running"})
        run_id = exp["runs"][0]["id"]
        driver = f"workers.entrypoint {run_id}"
        assert pids(driver)

        subprocess.run(["pkill", "-9", "-f", str(stack.ray_temp_dir)], check=False)  # the head node dies
        killed = time.monotonic()
        done = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"}, timeout=LOST_AFTER_S + 60)
        assert time.monotonic() - killed < LOST_AFTER_S + 60
        assert done["status"] == "failed" and "did not answer" in done["runs"][0]["error"]
        deadline = time.monotonic() + DRIVER_EXIT_S + 30
        while pids(driver) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids(driver), "the job's driver outlived the Ray head"
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json()["unavailable"] == ["ray"]

        queued = client.post("/v1/experiments", json=small_spec("fault-ray-after", max_steps=20)).json()
        time.sleep(2)
        assert client.get(f"/v1/experiments/{queued['id']}").json()["status"] == "queued"  # no head: it waits
        stack.procs = [p for p in stack.procs if p.poll() is None]
        stack.start_ray()
        stack.wait_ready()
        after = wait_for(client, queued["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert after["status"] == "succeeded", after["runs"][0]["error"]
    finally:
        if api is not None:
            api.stop()
        stack.stop()
