"""`task manifests`: write the ScaledObjects and worker Deployments the catalogue implies;
`--check` writes nothing and exits 1 naming the files that drifted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from manifests.rendering import drifted, write
from model_catalogue.catalogue import DEFAULT_CATALOGUE, CatalogueError, load_catalogue

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(prog="task manifests", description=__doc__)
    parser.add_argument("--catalogue", type=Path, default=DEFAULT_CATALOGUE)
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1 if any)")
    args = parser.parse_args()
    try:
        catalogue = load_catalogue(args.catalogue)
    except CatalogueError as exc:
        print(f"cannot generate: {exc}", file=sys.stderr)
        return 2
    source = args.catalogue.name
    if args.check:
        stale = drifted(catalogue, ROOT, source)
        for path in stale:
            print(f"{path}: differs from {source}; run `task manifests`", file=sys.stderr)
        return 1 if stale else 0
    for path in write(catalogue, ROOT, source):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
