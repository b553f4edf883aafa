"""A private MLflow tracking server (SQLite and artifacts under a test's folder) that a fault test
may stop and start again on the same port; the stack's own server is never touched."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class PrivateMlflow:
    folder: Path
    port: int
    proc: subprocess.Popen | None = field(default=None)  # type: ignore[type-arg]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        self.proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        raise RuntimeError("the private MLflow server did not start")

    def stop(self) -> None:
        """Kill the server and every process of its group (its gunicorn/uvicorn workers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port answers no more
            try:
                httpx.get(f"{self.uri}/health", timeout=1)
            except httpx.HTTPError:
                return
            time.sleep(0.2)
        raise RuntimeError("the private MLflow server still answers")
