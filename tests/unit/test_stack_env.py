"""What the embedded stack hands its children: Ray's settings and ours, never the API's tokens
(the Ray head passes its environment on to every job) and never the spec."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.launcher import job_env
from service.stack import Stack


def test_children_do_not_inherit_api_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRA_API_TOKENS", "s3cret-a,s3cret-b")
    monkeypatch.setenv("ORCHESTRA_API_TOKEN", "s3cret-c")
    stack = Stack(home=tmp_path)
    (tmp_path / "logs").mkdir()
    stack._spawn("probe", [sys.executable, "-c", "import os; print(sorted(os.environ))"])
    try:
        assert stack.procs[0].wait(timeout=60) == 0
    finally:
        stack.stop()
    seen = (tmp_path / "logs" / "probe.log").read_text()
    assert "ORCHESTRA_HOME" in seen and "RAY_AUTH_TOKEN_PATH" in seen
    assert "ORCHESTRA_API_TOKEN" not in seen


def test_job_env_carries_no_spec() -> None:
    env = job_env(run_id="r" * 32, experiment_id="e" * 32, mlflow_uri="http://127.0.0.1:5000",
                  mlflow_run_id="m", storage_path="/s")
    assert not any("SPEC" in key for key in env)
    assert sum(len(k) + len(v) for k, v in env.items()) < 1024


def test_no_process_reports_to_mlflows_usage_server() -> None:
    """MLflow's telemetry (an outside server) is off in the control plane, in the jobs, and in the
    workers however they start; a user's explicit setting is left alone."""
    assert job_env(run_id="r" * 32, experiment_id="e" * 32, mlflow_uri="http://127.0.0.1:5000",
                   mlflow_run_id="m" * 32, storage_path="/tmp/x")["MLFLOW_DISABLE_TELEMETRY"] == "true"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    for package in ("service", "workers"):
        code = f"import os, {package}; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             timeout=60)
        assert out.stdout.strip() == "true"
    out = subprocess.run([sys.executable, "-c", "import os, workers; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"],
                         env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, capture_output=True, text=True, check=True,
                         timeout=60)
    assert out.stdout.strip() == "false"
