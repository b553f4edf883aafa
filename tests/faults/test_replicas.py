"""More than one control-plane process on one PostgreSQL, as real processes on a real Ray:
`orchestra serve --workers 2` (two API processes on one port, each with its scheduler and
reconciler) takes submissions on either process; every run becomes exactly one Ray job, the
concurrency limit holds for the two together, every run ends `succeeded`. More than one process
on SQLite is refused with the reason."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.db import engine_for, session_factory, upgrade
from service.launcher import submission_id_for
from service.models import RunRow
from service.stack import free_port
from tests.conftest import ApiProcess, small_spec, wait_for

pytestmark = [pytest.mark.integration]

RUNS, LIMIT = 4, 2


def test_two_api_processes_dispatch_each_run_once_within_one_limit(stack, postgres_url: str,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    upgrade(postgres_url)
    port = free_port(28300)
    env = {**os.environ, **stack.env(), "ORCHESTRA_DATABASE_URL": postgres_url, "ORCHESTRA_HOME": str(tmp_path),
           "ORCHESTRA_STORAGE_PATH": str(tmp_path / "ray_results"), "ORCHESTRA_MAX_CONCURRENT_RUNS": str(LIMIT),
           "ORCHESTRA_SCHEDULER_INTERVAL_S": "0.3", "ORCHESTRA_RECONCILER_INTERVAL_S": "0.3"}
    api = ApiProcess(url=f"http://127.0.0.1:{port}", env=env, port=port, workers=2)
    api.start()
    sessions = session_factory(engine_for(postgres_url))
    peak, stop = 0, threading.Event()

    def watch() -> None:  # the limit, as the database shows it, for the whole test
        nonlocal peak
        while not stop.is_set():
            with sessions() as s:
                active = s.scalars(select(RunRow).where(RunRow.status.in_(["dispatched", "running"]))).all()
                peak = max(peak, len(active))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert api.proc is not None
        workers = subprocess.run(["pgrep", "-P", str(api.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 2, workers  # uvicorn's supervisor and its two API processes (and a resource tracker)
        client = httpx.Client(base_url=api.url, timeout=30)
        ids = []
        for i in range(RUNS):
            spec = small_spec(f"replica-{i}", max_steps=10, eval_every=10)
            spec["distributed"]["num_workers"] = 1
            ids.append(client.post("/v1/experiments", json=spec).json()["id"])
        finals = [wait_for(client, i, {"succeeded", "failed", "cancelled"}, timeout=400) for i in ids]
    finally:
        stop.set()
        watcher.join(timeout=10)
        api.stop()
    assert [e["status"] for e in finals] == ["succeeded"] * RUNS, [(e["status"], e["runs"]) for e in finals]
    assert 1 <= peak <= LIMIT, peak
    runs = [r for e in finals for r in e["runs"]]
    jobs = [j.submission_id for j in JobSubmissionClient(stack.ray_address).list_jobs()]
    for run in runs:
        assert jobs.count(submission_id_for(run["id"])) == 1, (run["id"], jobs)


def test_more_than_one_api_process_on_sqlite_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "ORCHESTRA_HOME": str(tmp_path), "ORCHESTRA_DATABASE_URL": f"sqlite:///{tmp_path / 'o.db'}"}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--workers", "2", "--port", str(free_port(28390))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--workers" in out.stderr + out.stdout and "PostgreSQL" in out.stderr + out.stdout
