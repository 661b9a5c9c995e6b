"""`python -m jobs train --config FILE` and `python -m jobs evaluate --config FILE [--adapter DIR]`: one job without Ray
(jobs/cli.py)."""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "evaluate"):
        print("usage: python -m jobs {train,evaluate} --config FILE [--adapter DIR]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))  # type: ignore[arg-type]
