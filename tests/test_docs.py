"""The documentation: a site that builds strictly, a configuration page generated from the
settings class (so it lists every variable a process accepts), and a short README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from docs.hooks import settings_table, variable_name
from settings.environment import Environment

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "pages"
README_MAX_LINES = 250
# The variables the README has always documented: a public contract.
DOCUMENTED = (
    "MODELS",
    "ENABLE_TEST_MODELS",
    "QUEUE_PREFIX",
    "MAX_QUEUE_LENGTH",
    "RETRY_DELAYS_S",
    "SCALEDOBJECTS_DIR",
)


def test_the_configuration_table_has_a_row_with_a_meaning_for_every_variable() -> None:
    table = settings_table()
    rows = {row.split("|")[1].strip(" `"): row for row in table.splitlines()[2:]}

    expected = {variable_name(name, field) for name, field in Environment.model_fields.items()}

    assert set(rows) == expected
    assert set(DOCUMENTED) <= set(rows)
    assert all(row.split("|")[4].strip() for row in rows.values())
    assert "RETRY_DELAYS_S_<MODEL>" in rows
    assert "`100000` | integer, >= 1 |" in rows["MAX_QUEUE_LENGTH"]


def test_given_a_variable_without_a_description_then_the_page_cannot_be_generated() -> None:
    class Undocumented(Environment):
        new_knob: int = Field(1, alias="NEW_KNOB")

    with pytest.raises(ValueError, match="new_knob has no description"):
        settings_table(Undocumented)


def test_every_page_is_in_the_navigation_and_the_readme_links_only_pages_that_exist() -> None:
    config = yaml.safe_load((ROOT / "docs" / "mkdocs.yml").read_text())
    in_nav = set(re.findall(r"[\w-]+\.md", yaml.safe_dump(config["nav"])))
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/pages/([\w-]+\.md)\)", readme))

    assert in_nav == {page.name for page in PAGES.glob("*.md")}
    assert linked and linked <= in_nav
    assert readme.count("\n") <= README_MAX_LINES


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links, missing pages or anchors fail the build (`task docs:build`)."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run(
        [
            str(mkdocs),
            "build",
            "--strict",
            "-f",
            str(ROOT / "docs" / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"},
    )

    assert result.returncode == 0, result.stderr[-3000:]
    configuration = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "MAX_QUEUE_LENGTH" in configuration and "{{ settings_table }}" not in configuration
    assert (tmp_path / "site" / "openapi.json").read_text().startswith("{")


def _gib(value: str) -> float:
    return float(value[:-2]) / 1024 if value.endswith("Mi") else float(value[:-2])


def test_the_kubernetes_page_states_the_kind_overlays_real_requests() -> None:
    """Cluster finding 5: the README's 4 CPUs left the first worker Pending."""
    from manifests.cluster_verify import OVERLAYS, cpus, render

    pods: list[tuple[str, int, dict[str, str]]] = []
    for doc in render(OVERLAYS["kind"]):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                pods.append(
                    (
                        doc["metadata"]["name"],
                        doc["spec"].get("replicas", 1),
                        container["resources"]["requests"],
                    )
                )
        if doc["kind"] == "RabbitmqCluster":
            pods.append(("rabbitmq", doc["spec"]["replicas"], doc["spec"]["resources"]["requests"]))
    platform = [p for p in pods if not p[0].startswith("worker-")]
    platform_cpus = sum(n * cpus(r["cpu"]) for _name, n, r in platform)
    gib = sum(n * _gib(r["memory"]) for _name, n, r in platform)
    all_cpus = sum(n * cpus(r["cpu"]) for _name, n, r in pods)
    all_gib = sum(n * _gib(r["memory"]) for _name, n, r in pods)
    page = " ".join((PAGES / "kubernetes.md").read_text().split())

    assert f"our pods request {platform_cpus:.1f} CPUs and {gib:.1f} GiB before any model worker runs" in page
    assert f"and {all_cpus:.1f} CPUs and {all_gib:.1f} GiB with one worker per model" in page
