"""The import shape of docs/architecture.md: api -> service -> service.spec -> algorithms (its
hyperparameter models); workers -> service.spec and algorithms; service never imports workers (it
starts them as a Ray job), and nothing imports api."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "algorithms": {"api", "service", "workers", "ray", "mlflow", "fastapi", "sqlalchemy", "deepspeed"},
    "workers": {"api"},
    "service": {"api", "workers"},  # the control plane starts workers as a Ray job, never by import
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def full_imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        hit = imports_of(path) & FORBIDDEN[package]
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_workers_use_only_the_spec_from_service() -> None:
    """The spec is the contract: workers import service.spec and nothing else of service."""
    bad = []
    for path in (ROOT / "workers").rglob("*.py"):
        for name in full_imports_of(path):
            if name.startswith("service") and not name.startswith("service.spec"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    for path in (ROOT / "service" / "spec").rglob("*.py"):
        for name in full_imports_of(path):
            if name.startswith("service") and not name.startswith("service.spec"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_spec_validates_without_torch() -> None:
    code = ("import sys; from service.spec import parse_spec; "
            "import algorithms.optimizers.config, algorithms.aggregation.config, algorithms.coding.config, "
            "algorithms.peft.config, algorithms.merging.config; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
