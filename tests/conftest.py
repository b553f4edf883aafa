"""Shared fixtures: a fresh PostgreSQL database per test (real server on 127.0.0.1:5432)."""

import os
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN = os.environ.get("ORCHESTRA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    import psycopg

    name = f"orch_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        from service.db import engine_for

        engine_for.cache_clear()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# ---- a real local stack: Ray head (token auth on), MLflow server, and `orchestra serve` ----------

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator["object"]:
    from service.stack import Stack

    s = Stack(home=tmp_path_factory.mktemp("stack"), dashboard_port=28265, gcs_port=26380, mlflow_port=25000,
              num_cpus=4)
    s.start()
    saved = dict(os.environ)
    os.environ.update(s.env())  # this process is a client of the cluster too (Ray token auth)
    try:
        s.wait_ready()
        yield s
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s.stop()


@pytest.fixture(scope="module")
def ray_on_stack(stack):  # type: ignore[no-untyped-def]
    """This process connected to the stack's Ray, for tests that run Ray Train themselves.

    Ray workers import the test modules (functions handed to Ray Train) from the repository root.
    """
    import ray

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    ray.init(address=f"127.0.0.1:{stack.gcs_port}", runtime_env={"env_vars": {"PYTHONPATH": path}},
             log_to_driver=False)
    try:
        yield stack
    finally:
        ray.shutdown()


@dataclass
class ApiProcess:
    url: str
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]
    ready_path: str = "/readyz"  # "/healthz" for an API whose Ray or MLflow is away on purpose
    workers: int = 1  # orchestra serve --workers

    def start(self) -> None:
        log = open(Path(self.env["ORCHESTRA_HOME"]) / f"api-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
                                      "--workers", str(self.workers)],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"orchestra serve exited with {self.proc.returncode}")
            time.sleep(0.3)
        raise RuntimeError("orchestra serve did not become ready")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture()
def api(stack, postgres_url: str, tmp_path: Path) -> Iterator[ApiProcess]:  # type: ignore[no-untyped-def]
    """`orchestra serve` on PostgreSQL, pointed at the separately started Ray and MLflow."""
    from service.db import upgrade
    from service.stack import free_port

    upgrade(postgres_url)
    port = free_port(28000)
    env = {**os.environ, **stack.env(), "ORCHESTRA_DATABASE_URL": postgres_url, "ORCHESTRA_HOME": str(tmp_path),
           "ORCHESTRA_STORAGE_PATH": str(tmp_path / "ray_results"), "ORCHESTRA_RECONCILER_INTERVAL_S": "0.5",
           "ORCHESTRA_SCHEDULER_INTERVAL_S": "0.5"}
    proc = ApiProcess(url=f"http://127.0.0.1:{port}", env=env, port=port)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def small_spec(name: str = "it-digits", **train: object) -> dict:  # type: ignore[type-arg]
    spec = {
        "name": name,
        "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                 "model": {"name": "mlp", "hidden": [64]}},
        "train": {"max_steps": 60, "batch_size": 64, "eval_every": 30, "log_every": 10, "seed": 0, **train},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "distributed": {"num_workers": 2, "use_gpu": False, "strategy": "ddp"},
    }
    return json.loads(json.dumps(spec))


def wait_for(client: httpx.Client, experiment_id: str, statuses: set[str], timeout: float = 300) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get(f"/v1/experiments/{experiment_id}").json()
        if exp["status"] in statuses:
            return exp  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} never reached {statuses}: {exp}")
