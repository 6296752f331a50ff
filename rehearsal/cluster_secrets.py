"""The Secrets as `task cluster-up` makes them: cluster/provision.sh's own `platform_secrets`
runs against a stand-in kubectl that answers for the operator's Secret (the broker's
administrator) and keeps what the script applies.
"""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROVISION = ROOT / "cluster" / "provision.sh"
FUNCTIONS = ("secret_value", "apply_secret", "broker_secrets", "store_secret", "platform_secrets")
# kubectl as provision.sh calls it: `-n NS get secret NAME -o jsonpath={.data.KEY}` reads a
# kept or given Secret, `create secret generic --dry-run=client -o yaml --from-file=K=F`
# prints one, `apply -f -` keeps it.
STAND_IN_KUBECTL = r"""#!/usr/bin/env bash
if [ "$1" = "-n" ]; then shift 2; fi
case "$1" in
  get)
    key="${5#jsonpath=\{.data.}"; key="${key%\}}"; key="${key//\\/}"
    file="$SECRETS_DIR/$3/$key"
    [ -f "$file" ] && base64 -w0 < "$file" ;;
  create)
    name="$4"; echo "apiVersion: v1"; echo "kind: Secret"; echo "metadata: {name: $name}"; echo "data:"
    for arg in "$@"; do
      case "$arg" in
        --from-file=*) spec="${arg#--from-file=}"; echo "  ${spec%%=*}: $(base64 -w0 < "${spec#*=}")" ;;
      esac
    done ;;
  apply) { echo "---"; cat; } >> "$SECRETS_DIR/applied.yaml" ;;
esac
"""

Secrets = dict[str, dict[str, str]]


def _functions() -> str:
    script = PROVISION.read_text()
    parts = []
    for name in FUNCTIONS:
        start = script.index(f"\n{name}() {{") + 1
        parts.append(script[start : script.index("\n}\n", start) + 3])
    return "".join(parts)


def make_secrets(folder: Path, provider: str, admin: tuple[str, str]) -> Secrets:
    """Every Secret cluster-up applies for `provider`, given the operator's administrator."""
    folder.mkdir(mode=0o700, parents=True)
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(STAND_IN_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    default_user = folder / "rabbitmq-default-user"
    default_user.mkdir()
    (default_user / "username").write_text(admin[0])
    (default_user / "password").write_text(admin[1])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SECRETS_DIR": str(folder)}
    script = f'{_functions()}\nNAMESPACE=inferq\nVHOST=inferq\nplatform_secrets "$1"\n'
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script, "provision", provider],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    secrets: Secrets = {}
    for doc in yaml.safe_load_all((folder / "applied.yaml").read_text()):
        if doc and doc.get("kind") == "Secret":
            data = doc.get("data") or {}
            secrets[doc["metadata"]["name"]] = {k: base64.b64decode(v).decode() for k, v in data.items()}
    return secrets
