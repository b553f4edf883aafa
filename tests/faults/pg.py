"""A private PostgreSQL cluster (initdb on a free port, under a test's temporary folder) that a
fault test may stop and start; the machine's own server is never touched."""

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    raise RuntimeError(f"PostgreSQL's {name} is not installed")


def _as_owner() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user there."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PrivatePostgres:
    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*_as_owner(), *args], check=True, capture_output=True, timeout=timeout)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(self.folder.parent, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"), "-w",
                  "-t", "30", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError("the private PostgreSQL did not start")

    def stop(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "-t", "30", "stop")
