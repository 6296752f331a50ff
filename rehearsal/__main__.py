"""`task cluster:rehearse -- --out DIR`: run the kind overlay as a kubelet would, locally;
writes DIR/rehearsal.json and DIR/summary.txt and exits 1 when anything it checks fails."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from rehearsal.run import Rehearsal, rehearse, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="task cluster:rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("rehearsal-out"), help="where the report and pod logs go"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "cluster:rehearse: run as root (pods get network namespaces, and run as their users)",
            file=sys.stderr,
        )
        return 2
    rehearsal = Rehearsal(args.out)
    report = asyncio.run(rehearse(rehearsal))
    rehearsal.write()
    print(summary(report))
    print(f"written: {args.out / 'rehearsal.json'}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
