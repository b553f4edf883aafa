"""The wheel as a user gets it: built from this tree, installed (not editable, no extras) into a
fresh virtualenv, then `orchestra db upgrade` on SQLite and PostgreSQL (Alembic's scripts found
inside the installed package), `orchestra serve`, a spec accepted (201) and a bad one refused (422
naming the field), all without torch importable.

By default the core's dependencies come from this checkout's .venv, without the network: the
closure of the wheel's Requires-Dist (no extras), resolved in .venv's metadata, is linked file by
file (each distribution's RECORD) into a folder that the fresh virtualenv puts on its path. So the
cluster extra (torch, DeepSpeed, Ray Train, transformers, the full MLflow) is absent there unless
a core requirement pulls it in. ORCHESTRA_WHEEL_DEPS=index installs the wheel with its
dependencies from the package index instead, as `pip install orchestra-*.whl` does (minutes, and
the network: `.ci/wheel-check`).

Only 127.0.0.1 is reached: Ray and MLflow are named at a closed local port.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "service", "workers", "algorithms")
FROM_INDEX = os.environ.get("ORCHESTRA_WHEEL_DEPS", "venv") == "index"
STEP_TIMEOUT_S = 900 if FROM_INDEX else 120

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800 if FROM_INDEX else 600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", STEP_TIMEOUT_S)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def build_wheel(tmp: Path) -> Path:
    """`pip wheel` of a copy of the tree (an in-tree build/ could hold modules deleted since)."""
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
               "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)])
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp / "dist").glob("orchestra-*.whl")
    return wheel


def core_closure(requires: list[str]) -> list[metadata.Distribution]:
    """The distributions that `requires` (without extras) pulls in, as installed in this venv."""
    dists: dict[str, metadata.Distribution] = {}
    done: dict[str, set[str]] = {}  # the extras whose requirements were followed, "" the plain ones
    todo = [r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key not in dists:
            try:
                dists[key] = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                pytest.fail(f"{req} (a core dependency) is not installed in {sys.prefix}: run `make setup`")
        dist = dists[key]
        assert req.specifier.contains(dist.version, prereleases=True), f"{req}: {dist.version} installed"
        extras = ({""} | set(req.extras)) - done.setdefault(key, set())
        if not extras:
            continue
        done[key] |= extras
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return list(dists.values())


def link_dependencies(wheel: Path, target: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [v.strip() for k, _, v in (line.partition(":") for line in zf.read(name).decode().splitlines())
                    if k == "Requires-Dist"]
    for dist in core_closure(requires):
        for rel in dist.files or []:
            if rel.parts[0] == "..":  # console scripts, outside site-packages
                continue
            source = Path(str(dist.locate_file(rel)))
            if not source.is_file():
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to(source)


@dataclass
class Installed:
    root: Path
    python: Path
    orchestra: Path
    env: dict[str, str]
    closed_port: int


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    python = venv / "bin" / "python"
    if FROM_INDEX:
        out = run([sys.executable, "-m", "venv", str(venv)])
        assert out.returncode == 0, out.stderr
        out = run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    else:
        out = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        assert out.returncode == 0, out.stderr
        out = run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                   "--no-index", "--disable-pip-version-check", str(wheel)])
    assert out.returncode == 0, out.stdout + out.stderr
    if not FROM_INDEX:
        deps = tmp / "deps"
        link_dependencies(wheel, deps)
        site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        (Path(site.stdout.strip()) / "orchestra_core_deps.pth").write_text(f"{deps}\n")
    closed = free_port()  # nothing listens there: Ray and MLflow are down
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ORCHESTRA_", "MLFLOW_", "RAY_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(ORCHESTRA_HOME=str(tmp / "home"), ORCHESTRA_DATABASE_URL=f"sqlite:///{tmp / 'db' / 'o.db'}",
               ORCHESTRA_RAY_ADDRESS=f"http://127.0.0.1:{closed}",
               ORCHESTRA_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed}",
               ORCHESTRA_BACKGROUND="false", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    yield Installed(root=tmp, python=python, orchestra=venv / "bin" / "orchestra", env=env, closed_port=closed)


def in_venv(inst: Installed, code: str) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path
    return run([str(inst.python), "-c", code], cwd=inst.root, env=inst.env)


def test_no_torch_and_the_package_is_the_installed_one(installed: Installed) -> None:
    out = in_venv(installed, "import torch")
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr, out.stderr
    code = (
        "import sys\n"
        "import service.db, api, workers, algorithms\n"
        "from service.spec import parse_spec\n"
        "import algorithms.optimizers.config, algorithms.aggregation.config, algorithms.coding.config\n"
        "import algorithms.peft.config, algorithms.merging.config\n"
        "for mod in (service.db, api, workers, algorithms):\n"
        "    assert mod.__file__.startswith(sys.prefix), mod.__file__\n"
        "m = service.db.MIGRATIONS\n"
        "assert (m / 'env.py').is_file() and (m / 'script.py.mako').is_file(), m\n"
        "assert sorted(p.name for p in (m / 'versions').glob('0*.py')), m\n"
        "from mlflow.tracking import MlflowClient\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "try:\n"
        f"    JobSubmissionClient('http://127.0.0.1:{installed.closed_port}')\n"
        "except ConnectionError:\n"
        "    pass  # got as far as the network: the client has what it needs\n"
        "for heavy in ('torch', 'deepspeed', 'transformers', 'ray.train'):\n"
        "    assert heavy not in sys.modules, heavy\n"
        "print('ok')\n"
    )
    out = in_venv(installed, code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_upgrade_on_postgres(installed: Installed, postgres_url: str) -> None:
    """The core's PostgreSQL driver (psycopg's binary build) and the shipped migrations."""
    env = dict(installed.env, ORCHESTRA_DATABASE_URL=postgres_url)
    out = run([str(installed.orchestra), "db", "upgrade"], cwd=installed.root, env=env)
    assert out.returncode == 0 and "database at revision head" in out.stdout, out.stdout + out.stderr
    code = ("import psycopg\n"
            "assert psycopg.pq.__impl__ == 'binary', psycopg.pq.__impl__\n"
            "from service.db import current_revision, engine_for, head_revision\n"
            f"url = {postgres_url!r}\n"
            "assert current_revision(engine_for(url)) == head_revision(url) is not None\n")
    out = in_venv(installed, code)
    assert out.returncode == 0, out.stdout + out.stderr


def test_upgrade_serve_accept_and_refuse(installed: Installed) -> None:
    orchestra = str(installed.orchestra)
    port = free_port()
    out = run([orchestra, "serve", "--port", str(port)], cwd=installed.root, env=installed.env)
    assert out.returncode == 1 and "orchestra db upgrade" in out.stderr, out.stdout + out.stderr
    out = run([orchestra, "db", "upgrade"], cwd=installed.root, env=installed.env)
    assert out.returncode == 0 and "database at revision head" in out.stdout, out.stdout + out.stderr

    log = (installed.root / "serve.log").open("w")
    proc = subprocess.Popen([orchestra, "serve", "--port", str(port)], cwd=installed.root, env=installed.env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=api, timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (installed.root / "serve.log").read_text()
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "serve not up in 60 s"
                time.sleep(0.25)

            quickstart = (ROOT / "examples" / "quickstart.yaml").read_text()
            headers = {"Content-Type": "application/yaml"}
            r = client.post("/v1/experiments", content=quickstart, headers=headers)
            assert r.status_code == 201, r.text
            assert r.json()["status"] == "queued"
            bad = re.sub(r"max_steps: *\d+", "max_steps: -5", quickstart, count=1)
            assert bad != quickstart
            r = client.post("/v1/experiments", content=bad, headers=headers)
            assert r.status_code == 422, r.text
            assert "train.max_steps" in [p["field"] for p in r.json()["detail"]], r.text

            r = client.get("/readyz")  # Ray and MLflow down: said so, the database answers
            assert r.status_code == 503 and set(r.json()["unavailable"]) == {"ray", "mlflow"}, r.text
            versions = client.get("/v1/info").json()["versions"]
            assert versions["orchestra"] == "0.1.0" and versions["torch"] == "absent", versions
        assert "require the ray[default]" not in (installed.root / "serve.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
