"""The import contracts in pyproject.toml hold on this tree, and a wrong import breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "root_packages"
]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the code and its contracts, to break on purpose."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_as_committed_keeps_every_contract(tree: Path) -> None:
    result = _lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "broken_contract"),
    [
        ("ingress/app.py", "import ray_workers.job_worker", "meet only through the broker"),
        ("callbacks/dispatcher.py", "import ingress.app", "never import the ingress"),
        ("callbacks/dispatcher.py", "import aio_pika", "aio-pika and aiormq only in broker.client"),
        ("local_stack/launcher.py", "import ray", "Ray only in the Ray glue"),
        ("ingress/app.py", "import httpx", "httpx only in the queue-metrics reader"),
        ("policies/circuit_breaker.py", "import broker.client", "Pure policies"),
        ("ingress/app.py", "import grpc", "grpc only in the push scaler's service"),
        ("wire/envelope.py", "import ingress.problems", "Layers"),
    ],
)
def test_given_a_wrong_import_then_lint_imports_fails_naming_the_contract(
    tree: Path, module: str, wrong_import: str, broken_contract: str
) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # deliberately wrong\n")

    result = _lint_imports(tree)

    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert any(broken_contract in line for line in broken), result.stdout


def test_no_package_holds_more_than_about_15_percent_of_the_code() -> None:
    """One concept per folder: a folder that outgrows its share is holding a second one."""
    lines = {
        package: sum(len(path.read_text().splitlines()) for path in (ROOT / package).rglob("*.py"))
        for package in PACKAGES
    }
    total = sum(lines.values())
    largest = max(lines, key=lambda package: lines[package])

    assert lines[largest] / total <= 0.16, f"{largest}/ holds {lines[largest]} of {total} lines"
