"""The embedded stack of ``orchestra up``: a local Ray head (with its dashboard, for the Jobs
API, and token auth on), a local MLflow server (SQLite backend, local artifacts), the database
migrated; every process started here is stopped on exit."""

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_SECRETS = frozenset({"ORCHESTRA_API_TOKENS", "ORCHESTRA_API_TOKEN"})
MLFLOW_ADMIN = "admin"  # the basic-auth app's admin, the stack's one MLflow user
RAY_NICE = 10  # the local Ray head's CPU priority below the API's (see start_ray)


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else a free port from the OS."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


@dataclass
class Stack:
    home: Path
    api_port: int = 8000
    dashboard_port: int = 8265
    gcs_port: int = 6380
    mlflow_port: int = 5000
    num_cpus: int | None = None
    # MLflow behind its basic-auth app: an admin password generated on first start (kept in the
    # home, 0600), which the API and every Ray process get as MLflow's client credentials
    mlflow_auth: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ray_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.home / 'orchestra.db'}"

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's session folder, one per home (not the shared /tmp/ray), short for Unix sockets."""
        digest = hashlib.sha1(str(self.home.resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"orchestra-ray-{digest}"

    def _secret(self, name: str) -> Path:
        """A secret of this home, made on first use, readable by its owner only."""
        path = self.home / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32))
        return path

    def _token_path(self) -> Path:
        return self._secret("ray_auth_token")

    def mlflow_credentials(self) -> dict[str, str]:
        """MLflow's client credentials (its own variables, which its client reads), when MLflow is
        behind its basic-auth app; none otherwise."""
        if not self.mlflow_auth:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
                "MLFLOW_TRACKING_PASSWORD": self._secret("mlflow_admin_password").read_text().strip()}

    def env(self) -> dict[str, str]:
        """Environment for this process and its children: Ray's token auth, our settings."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self._token_path()),
            "RAY_USAGE_STATS_ENABLED": "0",
            # One machine: no node is ever drained or preempted, so Ray Train's preemption watcher
            # (an actor started with every run, before its first step) has nothing to watch
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "ORCHESTRA_HOME": str(self.home),
            "ORCHESTRA_DATABASE_URL": self.database_url,
            "ORCHESTRA_RAY_ADDRESS": self.ray_address,
            "ORCHESTRA_MLFLOW_TRACKING_URI": self.mlflow_uri,
            **self.mlflow_credentials(),
        }

    def _spawn(self, name: str, cmd: list[str], *, nice: int = 0, extra_env: dict[str, str] | None = None) -> None:
        log = open(self.home / "logs" / f"{name}.log", "ab")
        # The API's own secrets stay in the API: the Ray head passes its environment on to every
        # job driver and worker, and MLflow has no use for them.
        inherited = {k: v for k, v in os.environ.items() if k not in API_SECRETS}
        env = {**inherited, **self.env(), **(extra_env or {})}
        lower = (lambda: os.nice(nice)) if nice else None  # noqa: E731
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True, preexec_fn=lower))

    def start(self) -> None:
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        (self.home / "mlflow").mkdir(exist_ok=True)
        self.dashboard_port = free_port(self.dashboard_port)
        self.gcs_port = free_port(self.gcs_port)
        self.mlflow_port = free_port(self.mlflow_port)
        self.start_ray()
        self.start_mlflow()

    def start_mlflow(self) -> None:
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        folder = self.home / "mlflow"
        folder.mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent
        auth: dict[str, str] = {}
        args: list[str] = []
        if self.mlflow_auth:
            ini = folder / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                           f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = {MLFLOW_ADMIN}\n")
            args = ["--app-name", "basic-auth"]
            auth = {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
                    "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_credentials()["MLFLOW_TRACKING_PASSWORD"],
                    # the auth app's CSRF protection signs with it: stable across restarts of the home
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": self._secret("mlflow_secret_key").read_text().strip()}
        self._spawn("mlflow", [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                               str(self.mlflow_port), "--workers", "1", "--backend-store-uri",
                               f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                               str(folder / "artifacts"), *args],
                    # MLflow 3's GenAI job runner (a pool of huey consumers) is not used here: off
                    extra_env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **auth})

    def start_ray(self) -> None:
        """The Ray head alone, on the stack's ports (also to bring a head back after it died)."""
        bin_dir = Path(sys.executable).parent
        cpus = self.num_cpus or max(4, 2 * (os.cpu_count() or 1))
        # Ray's fixed default ports (client server 10001, agent 52365) would clash with a second
        # local cluster; take free ones outside Ray's worker port range (10002-19999).
        client_port, agent_port = free_port(23001), free_port(23002)
        self._spawn("ray", [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                            f"--ray-client-server-port={client_port}",
                            f"--dashboard-agent-listen-port={agent_port}",
                            f"--num-cpus={cpus}", "--include-dashboard=true", "--disable-usage-stats",
                            f"--temp-dir={self.ray_temp_dir}"],
                    # One machine shared by training and the control plane: Ray's processes (and
                    # so every job's) yield the CPU to the API and MLflow when both want it.
                    nice=RAY_NICE)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {"ray": f"{self.ray_address}/api/version", "mlflow": f"{self.mlflow_uri}/health"}
        while pending and time.monotonic() < deadline:
            for name, url in list(pending.items()):
                try:
                    if httpx.get(url, timeout=2).status_code < 500:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a stack process exited early (see {self.home / 'logs'})")
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"not ready after {timeout_s:.0f}s: {sorted(pending)} (logs in {self.home / 'logs'})")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every process group started here, SIGKILL to those still there after
        ``grace_s``: a Ray head's GCS lingers about 30 s after its raylet has gone, and neither it
        nor the local MLflow server holds anything a kill can lose."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: children outlive their parent
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        self.procs.clear()
