"""viewkeeper's benchmarks: one entry point, one table.

    .venv/bin/python -m bench.run            # every benchmark
    .venv/bin/python -m bench.run --quick    # shorter runs (CI smoke)
    .venv/bin/python -m bench.run decode     # only the named modules

Adding a benchmark: write ``bench/<name>.py`` with ``run(args) -> list[Row]`` (see
``bench/common.py``) and add its name to :data:`MODULES`. Targets that are missed are printed
as ``NO`` in the table; the exit status stays 0 so a slow machine does not fail a build — a
module that *crashes* exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `viewkeeper` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, print_table

# One line per benchmark module (bench/<name>.py), in the order they run.
MODULES: list[str] = [
    "decode",
    "redis_pipeline",
    "changelog",
    "counters",
    "opensearch_pipeline",
    "latency",
    "scale",
    "rebuild",
    "memory",
    "processes",
    "cluster",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"modules to run (default: all of {MODULES})")
    parser.add_argument("--quick", action="store_true", help="fewer pages and rounds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.names or MODULES
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {MODULES}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    failed: list[str] = []
    for name in names:
        started = time.monotonic()
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            rows.extend(module.run(args))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"  bench.{name}: {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    missed = [r.figure for r in rows if r.met is False]
    if missed:
        print(f"\n{len(missed)} target(s) missed: {', '.join(missed)}")
    if failed:
        print(f"\nbenchmark module(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
