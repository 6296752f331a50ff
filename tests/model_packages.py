"""A user's model package built in a temporary directory and pip-installed into this venv
for the length of a test: code that lives outside the platform's source tree, found as
an installed package would be (by its import path, or by the `inferq.models` entry point)."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]


@contextlib.contextmanager
def installed_package(
    where: Path, package: str, modules: Mapping[str, str], entry_points: Mapping[str, str] | None = None
) -> Iterator[None]:
    """`package` with `modules` (module name -> source), declaring `entry_points` (model
    name -> `module:Class` inside the package), installed while the block runs."""
    source = where / f"dist-{package}"
    (source / package).mkdir(parents=True)
    (source / package / "__init__.py").write_text("")
    for module, text in modules.items():
        (source / package / f"{module}.py").write_text(text)
    points = "".join(f'{name} = "{package}.{target}"\n' for name, target in (entry_points or {}).items())
    (source / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{package}"
            version = "0.1.0"

            [tool.setuptools]
            packages = ["{package}"]
            """
        )
        + (f'\n[project.entry-points."inferq.models"]\n{points}' if points else "")
    )
    install = [*PIP, "install", "--no-deps", "--no-build-isolation", "--no-index", str(source)]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        subprocess.run([*PIP, "uninstall", "-y", package], check=True, capture_output=True, timeout=120)
