"""Secrets never on a command line (budgets issue, review item 17): `cluster/provision.sh`
and `task cluster:secrets` gave kubectl every password and URL as `--from-literal`, which
every user of the machine can read in /proc/*/cmdline. Run against a stand-in kubectl on
PATH that records its arguments and what it was asked to apply."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-pa55,word"
FAKE_KUBECTL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$KUBECTL_LOG"
if [ "$1" = "-n" ]; then shift 2; fi
if [ "$1" = "create" ]; then
  echo "data:"
  for arg in "$@"; do
    case "$arg" in
      --from-file=*)
        spec="${arg#--from-file=}"
        echo "  ${spec%%=*}: $(base64 -w0 < "${spec#*=}")" ;;
      --from-env-file=*)
        while IFS='=' read -r k v; do
          echo "  $k: $(printf '%s' "$v" | base64 -w0)"
        done < "${arg#--from-env-file=}" ;;
      --from-literal=*)
        spec="${arg#--from-literal=}"
        echo "  ${spec%%=*}: $(printf '%s' "${spec#*=}" | base64 -w0)" ;;
    esac
  done
elif [ "$1" = "apply" ]; then
  cat >> "$KUBECTL_APPLIED"
fi
"""


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KUBECTL_LOG": str(tmp_path / "argv.log"),
        "KUBECTL_APPLIED": str(tmp_path / "applied.yaml"),
    }


def _outcome(env: dict[str, str]) -> tuple[str, str]:
    return Path(env["KUBECTL_LOG"]).read_text(), Path(env["KUBECTL_APPLIED"]).read_text()


def test_provision_sh_gives_kubectl_secret_values_in_files_not_arguments(
    fake_kubectl: dict[str, str],
) -> None:
    script = (ROOT / "cluster/provision.sh").read_text()
    function = script[
        script.index("apply_secret() {") : script.index("\n}\n", script.index("apply_secret() {")) + 2
    ]
    subprocess.run(
        [
            "bash",
            "-euo",
            "pipefail",
            "-c",
            f'{function}\nNAMESPACE=inferq\napply_secret inferq API_KEYS="$1" X=y',
            "-",
            SECRET,
        ],
        env=fake_kubectl,
        check=True,
    )

    argv, applied = _outcome(fake_kubectl)
    assert SECRET not in argv
    assert f"API_KEYS: {base64.b64encode(SECRET.encode()).decode()}" in applied


@pytest.mark.skipif(
    not (ROOT / ".venv/bin/task").exists(), reason="the task binary comes with ./task's first run"
)
def test_task_cluster_secrets_gives_kubectl_secret_values_in_files_not_arguments(
    fake_kubectl: dict[str, str],
) -> None:
    env = {
        **fake_kubectl,
        "AMQP_URL": f"amqp://u:{SECRET}@rabbit/",
        "RABBITMQ_MANAGEMENT_URL": f"http://u:{SECRET}@rabbit:15672",
        "WEBHOOK_SECRET": f"whsec_{SECRET}",
        "API_KEYS": SECRET,
    }
    task = shutil.which("task", path=str(ROOT / ".venv/bin"))
    assert task is not None, "the task binary comes with ./task's first run"
    subprocess.run([task, "cluster:secrets"], cwd=ROOT, env=env, check=True, capture_output=True)

    argv, applied = _outcome(env)
    assert SECRET not in argv
    assert f"API_KEYS: {base64.b64encode(SECRET.encode()).decode()}" in applied
