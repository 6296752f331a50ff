"""The upstream CRDs our custom resources are validated against, pinned by commit and digest.

The monitoring CRDs (ServiceMonitor, PodMonitor, PrometheusRule) are kept in this repository
(`manifests/crds/`, no shared copy exists): exactly the files the pinned kube-prometheus-stack
chart installs, so a chart bump must bring its CRDs, and the monitors are checked against them.

Every other CRD is read from the first place that has it:
1. its variable's folder (`KEDA_CRD_DIR`, `RABBITMQ_CRD_DIR`; CI points them at
   ../shared/schemas), which, when set, is the only place looked at;
2. `../shared/schemas/<folder>` beside the checkout (this project's machines);
3. the cache (`$XDG_CACHE_HOME/inferq/crds/<commit>/`, default `~/.cache`), filled by
   `fetch_missing` from GitHub at the pinned commit; a download whose SHA-256 is not
   the pinned one is refused, so a cached file is always the file the digest names.

`python -m manifests.upstream_crds` (`task crds`) fetches what is missing and says where
each CRD is read from.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDORED = Path(__file__).resolve().parent / "crds"
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas"
GITHUB_RAW = "https://raw.githubusercontent.com"
FETCH_TIMEOUT_S = 10.0
MAX_CRD_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class UpstreamCrd:
    group: str
    kind: str
    variable: str
    folder: str
    filename: str
    repository: str
    commit: str
    sha256: str
    source_folder: str = "config/crd/bases"
    vendored: bool = False

    def url(self, base: str = GITHUB_RAW) -> str:
        return f"{base}/{self.repository}/{self.commit}/{self.source_folder}/{self.filename}"


# The commits ../shared/schemas/README.md names (KEDA v2.20.1 + main, the cluster operator
# as of Aug 2026), and the digests of those files.
_KEDA = ("kedacore/keda", "8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a")
_OPERATOR = ("rabbitmq/cluster-operator", "06cda8e8e1a927a652dda20a1b169fe7667f4916")
# kube-prometheus-stack, as cluster/provision.sh installs it; its CRDs (prometheus-operator
# v0.93.1) are those in manifests/crds/, taken from the chart at this tag.
PROMETHEUS_STACK_CHART_VERSION = "88.5.3"
_STACK = ("prometheus-community/helm-charts", f"kube-prometheus-stack-{PROMETHEUS_STACK_CHART_VERSION}")
_STACK_CRDS = "charts/kube-prometheus-stack/charts/crds/crds"
CRDS = (
    UpstreamCrd(
        "keda.sh",
        "ScaledObject",
        "KEDA_CRD_DIR",
        "keda",
        "keda.sh_scaledobjects.yaml",
        *_KEDA,
        "207afc4ca44fd9e3f4bbfb1c8fae08f3a365e098a52714fe8eb672bbd239cbcd",
    ),
    UpstreamCrd(
        "keda.sh",
        "TriggerAuthentication",
        "KEDA_CRD_DIR",
        "keda",
        "keda.sh_triggerauthentications.yaml",
        *_KEDA,
        "990851d71901905bc9bebb50cd964bfc909ca24a03dd401a626a1894bb912ecd",
    ),
    UpstreamCrd(
        "rabbitmq.com",
        "RabbitmqCluster",
        "RABBITMQ_CRD_DIR",
        "rabbitmq",
        "rabbitmq.com_rabbitmqclusters.yaml",
        *_OPERATOR,
        "3d12de2e4281eb91c49d9860b733b6aa741fe0f608c6a2c4160226fe4993d0de",
    ),
)
# Kept in manifests/crds/ (see the module's docstring), never fetched.
VENDORED_CRDS = tuple(
    UpstreamCrd(
        "monitoring.coreos.com",
        kind,
        "",
        "monitoring.coreos.com",
        filename,
        *_STACK,
        digest,
        source_folder=_STACK_CRDS,
        vendored=True,
    )
    for kind, filename, digest in (
        (
            "ServiceMonitor",
            "crd-servicemonitors.yaml",
            "3322d612f23bf144c887c94bf247b0b4a69189adf37c0d482d2c6267ffe906ab",
        ),
        (
            "PodMonitor",
            "crd-podmonitors.yaml",
            "41de2587baafa31240438654a3ae5dc19ef40296c31cb186855fa4ce85b03fb9",
        ),
        (
            "PrometheusRule",
            "crd-prometheusrules.yaml",
            "72b1e5f9959e67990d1598eb31b24ca4415007e31df3916356ef216316b2bf40",
        ),
    )
)


class CrdFetchFailed(RuntimeError):
    """A CRD could not be downloaded, or what came was not the pinned file."""


def crd_for(group: str, kind: str) -> UpstreamCrd | None:
    return next((crd for crd in CRDS + VENDORED_CRDS if (crd.group, crd.kind) == (group, kind)), None)


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "inferq" / "crds"


def candidates(
    crd: UpstreamCrd, env: Mapping[str, str] = os.environ, shared: Path = SHARED_SCHEMAS
) -> list[Path]:
    """Where `crd` is looked for, in order (only its variable's folder when that is set)."""
    if crd.vendored:
        return [VENDORED / crd.folder / crd.filename]
    if env.get(crd.variable):
        return [Path(env[crd.variable]) / crd.filename]
    return [shared / crd.folder / crd.filename, cache_dir(env) / crd.commit / crd.filename]


def locate(
    crd: UpstreamCrd, env: Mapping[str, str] = os.environ, shared: Path = SHARED_SCHEMAS
) -> Path | None:
    return next((path for path in candidates(crd, env, shared) if path.is_file()), None)


def missing(env: Mapping[str, str] = os.environ, shared: Path = SHARED_SCHEMAS) -> list[UpstreamCrd]:
    return [crd for crd in CRDS if locate(crd, env, shared) is None]


def fetch(crd: UpstreamCrd, env: Mapping[str, str] = os.environ, base_url: str = GITHUB_RAW) -> Path:
    """Download `crd` at its pinned commit into the cache; CrdFetchFailed when it cannot,
    or when the bytes are not the pinned file."""
    url = crd.url(base_url)
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as answer:
            body: bytes = answer.read(MAX_CRD_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise CrdFetchFailed(f"cannot fetch {url}: {exc}") from exc
    digest = hashlib.sha256(body).hexdigest()
    if digest != crd.sha256:
        raise CrdFetchFailed(f"{url}: SHA-256 {digest} is not the pinned {crd.sha256}; not cached")
    target = cache_dir(env) / crd.commit / crd.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        partial.write(body)
    Path(partial.name).replace(target)  # whole or absent, never half a file
    return target


def fetch_missing(
    env: Mapping[str, str] = os.environ, shared: Path = SHARED_SCHEMAS, base_url: str = GITHUB_RAW
) -> list[str]:
    """Fetch every CRD found nowhere (never into a folder a variable names); the reasons
    for those still missing."""
    problems = []
    for crd in missing(env, shared):
        if crd.vendored:
            problems.append(
                f"{crd.filename} is missing from {VENDORED / crd.folder} (kept in the repository)"
            )
            continue
        if env.get(crd.variable):
            problems.append(f"{crd.filename} is not in {crd.variable}={env[crd.variable]}")
            continue
        try:
            fetch(crd, env, base_url)
        except CrdFetchFailed as exc:
            problems.append(str(exc))
    return problems


@functools.cache
def fetch_missing_once() -> tuple[str, ...]:
    """`fetch_missing` for this process's environment, tried once per process (a machine
    without a network pays one timeout, not one per test)."""
    return tuple(fetch_missing())


def main() -> int:
    problems = fetch_missing()
    for crd in CRDS:
        path = locate(crd)
        print(f"{crd.group}/{crd.kind}: {path if path else 'missing'}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
