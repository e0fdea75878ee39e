"""A tiny shared harness for viewkeeper's benchmarks (run them all with ``bench/run.py``).

Why recorded pages: moto is the bottleneck of any end-to-end run (~4,200 GetRecords
records/s on a 2-core machine), so viewkeeper's own throughput is measured on GetRecords page bodies
built here, byte for byte what the service sends, and latency is measured elsewhere.

Every bench module exposes ``run(args) -> list[Row]``; ``args`` is the argparse namespace of
``bench/run.py`` (``args.quick`` shortens the runs).
"""

from __future__ import annotations

import argparse
import base64
import gc
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "PAGE_RECORDS",
    "Row",
    "best_of",
    "isolated",
    "make_item",
    "make_page",
    "make_pages",
    "make_record",
    "measure_main",
    "print_table",
    "rate",
]

PAGE_RECORDS = 1000  # GetRecords returns at most 1000 records per call
_SEQ_BASE = 10**20 + 4_000_000_000  # 21 digits, like DynamoDB's sequence numbers
_STATUSES = ("NEW", "PAID", "PACKED", "SHIPPED", "DELIVERED", "CANCELLED")
_TAGS = ("gift", "express", "fragile", "bulk", "priority", "eco", "vip")


@dataclass(frozen=True)
class Row:
    """One line of the report. ``value`` and ``baseline`` are in ``unit`` (higher is better
    for rates); ``ratio`` = value / baseline; ``met`` says whether ``ratio`` (or ``value``
    when there is no baseline) reached ``target``."""

    figure: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: float | None = None
    met: bool | None = None

    @classmethod
    def compare(
        cls, figure: str, value: float, unit: str, baseline: float, target: float | None
    ) -> Row:
        """A row whose target is a ratio over the baseline (``target=5`` means ≥ 5x)."""
        ratio = value / baseline if baseline else float("inf")
        met = None if target is None else ratio >= target
        return cls(figure, value, unit, baseline, ratio, target, met)


def _s(text: str) -> dict[str, Any]:
    return {"S": text}


def _n(number: object) -> dict[str, Any]:
    return {"N": str(number)}


def make_item(rng: random.Random, order_no: int, version: int) -> dict[str, Any]:
    """One order in DynamoDB JSON (wire form): 12 attributes incl. a nested map, a list of
    maps, a string set, integers and decimals, a bool, a NULL and a binary."""
    lines = rng.randint(1, 3)
    return {
        "order_id": _s(f"o-{order_no:08d}"),
        "customer_id": _s(f"c-{rng.randrange(50_000):06d}"),
        "status": _s(_STATUSES[version % len(_STATUSES)]),
        "total": _n(f"{rng.randrange(100, 99_999)}.{rng.randrange(100):02d}"),
        "created_at": _n(1_700_000_000 + order_no),
        "version": _n(version),
        "gift": {"BOOL": rng.random() < 0.1},
        "coupon": {"NULL": True},
        "tags": {"SS": rng.sample(_TAGS, 3)},
        "checksum": {"B": base64.b64encode(rng.randbytes(12)).decode("ascii")},
        "address": {
            "M": {
                "street": _s(f"{rng.randrange(1, 400)} Main Street"),
                "city": _s(rng.choice(("Lyon", "Oslo", "Porto", "Graz"))),
                "zip": _s(f"{rng.randrange(10_000, 99_999)}"),
                "geo": {"M": {"lat": _n("45.764043"), "lon": _n("4.835659")}},
            }
        },
        "lines": {
            "L": [
                {
                    "M": {
                        "sku": _s(f"sku-{rng.randrange(10_000):05d}"),
                        "qty": _n(rng.randint(1, 5)),
                        "price": _n(f"{rng.randrange(1, 500)}.{rng.randrange(100):02d}"),
                    }
                }
                for _ in range(lines)
            ]
        },
    }


def make_record(rng: random.Random, n: int) -> dict[str, Any]:
    """Record ``n`` of a stream: mostly MODIFY (new + old image), some INSERT and REMOVE."""
    order_no = rng.randrange(200_000)
    kind = rng.random()
    event = "MODIFY" if kind < 0.8 else ("INSERT" if kind < 0.95 else "REMOVE")
    body: dict[str, Any] = {
        "ApproximateCreationDateTime": 1_767_225_600.0 + n / 1000,
        "Keys": {"order_id": _s(f"o-{order_no:08d}")},
        "SequenceNumber": str(_SEQ_BASE + n * 7),
        "SizeBytes": 0,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    version = rng.randint(1, 9)
    if event != "REMOVE":
        body["NewImage"] = make_item(rng, order_no, version)
    if event != "INSERT":
        body["OldImage"] = make_item(rng, order_no, version - 1)
    body["SizeBytes"] = len(orjson.dumps(body))
    return {
        "eventID": f"{rng.getrandbits(128):032x}",
        "eventName": event,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": body,
    }


def make_page(rng: random.Random, first: int, count: int = PAGE_RECORDS) -> bytes:
    """A GetRecords response body: ``count`` records and a NextShardIterator."""
    page = {
        "Records": [make_record(rng, first + i) for i in range(count)],
        "NextShardIterator": "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/"
        "2026-01-01T00:00:00.000|1|" + base64.b64encode(rng.randbytes(300)).decode("ascii"),
    }
    return orjson.dumps(page)


def make_pages(pages: int, seed: int = 20260101) -> list[bytes]:
    """``pages`` deterministic page bodies of :data:`PAGE_RECORDS` records each."""
    rng = random.Random(seed)
    return [make_page(rng, i * PAGE_RECORDS) for i in range(pages)]


def best_of(
    fn: Callable[[], object],
    repeat: int = 5,
    number: int = 1,
    setup: Callable[[], object] | None = gc.collect,
    clock: Callable[[], float] = time.process_time,
) -> float:
    """Seconds per call of ``fn``: the best of ``repeat`` rounds of ``number`` calls (the best,
    not the mean, because noise on a shared machine only ever adds time). ``setup`` runs
    before each round, untimed: by default a full garbage collection, so that every round
    starts from the same heap and pays its own collections, not its predecessor's.

    The default clock is the process's CPU time, not wall time: these benchmarks are
    single-threaded CPU work, and on a busy 2-core machine wall time mostly measures the
    neighbours. Pass ``clock=time.perf_counter`` for anything that waits on I/O.
    """
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = clock()
        for _ in range(number):
            fn()
        best = min(best, (clock() - t0) / number)
    return best


def isolated(module: str, variant: str, repeat: int) -> float:
    """Run ``python -m <module> --measure <variant> --repeat <n>`` in a fresh interpreter and
    return the number it prints last.

    Why: a measurement depends on the heap that earlier ones left behind (the collector's
    thresholds, fragmentation, a loaded botocore model), so comparing two code paths in one
    process favours whichever runs first. Each variant gets an identical fresh process.
    """
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", module, "--measure", variant, "--repeat", str(repeat)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def measure_main(measures: Mapping[str, Callable[[int], float]]) -> None:
    """The ``__main__`` side of :func:`isolated`: ``--measure NAME --repeat N`` prints
    ``measures[NAME](N)``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", choices=sorted(measures), required=True)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(measures[args.measure](args.repeat))


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def print_table(rows: Sequence[Row], out: Any = None) -> None:
    """Print the rows as an aligned text table (figure, value, baseline, ratio, target, met)."""
    out = out or sys.stdout
    header = ("figure", "value", "baseline", "ratio", "target", "met?")
    cells = [
        (
            r.figure,
            _fmt(r.value, r.unit),
            _fmt(r.baseline, r.unit),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            "-" if r.target is None else (f"≥ {r.target:g}x" if r.baseline else f"≥ {r.target:g}"),
            "-" if r.met is None else ("yes" if r.met else "NO"),
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line, file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for c in cells:
        print(
            "  ".join(
                (v.ljust(w) if i == 0 else v.rjust(w))
                for i, (v, w) in enumerate(zip(c, widths, strict=True))
            ),
            file=out,
        )
