"""Processes per host (issue #14): does a second process on this 2-core machine apply more
records per second, and what bounds it?

1. Recorded pages → the real Redis. :data:`SHARDS` shards of recorded GetRecords pages
   (:func:`bench.redis_pipeline.steady_pages`, disjoint keys per shard, each item already in
   Redis at an older version: a cache's steady state) are drained by N = 1 and N = 2
   processes, each running the daemon's path (a :class:`~viewkeeper.runtime.worker.
   ShardWorker` thread per shard it holds → ``Pipeline`` → ``RedisSink``); the shards are
   dealt to the processes as the leases would spread them (S/N each). Figures: the
   throughput of each N (records over the wall time from the first process's start to the
   last one's end), their ratio (target ≥ :data:`TARGET_RATIO`), each process's records per
   CPU-second (its own CPU time, every thread), and Redis's own CPU per record (``INFO cpu``
   ``used_cpu_user + used_cpu_sys`` before and after, over the records): Redis is one
   single-threaded process, so ``1 / that`` is the ceiling of any number of processes on a
   larger host. Redis shares this machine's two cores with the processes.
2. End to end through moto: one table, written first (untimed), drained by ``viewkeeper run
   --processes N`` (real processes: parent and children); the time from the first entry in
   Redis to the last. A moto table has ONE shard, so only one process can hold it: the second
   process has nothing to read, and moto's GetRecords bounds the rest. Reported to show
   that bound, not a scaling figure.

Variants run interleaved, round after round; each figure is the best round. Redis is the
test bed's (it is FLUSHDB'ed: run this only against a test bed of your own).

    .venv/bin/python -m bench.run processes [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Row, rate
from bench.redis_pipeline import (
    ENV_DYNAMODB,
    KEY_NAMES,
    SEQ_STEP,
    TABLE,
    make_view,
    redis_client,
    service_url,
    shift_sequences,
    steady_pages,
    warm_pages,
)

__all__ = ["run"]

SHARDS = 4
TARGET_RATIO = 1.5
ROOT = Path(__file__).resolve().parent.parent


# --- a child: some shards, the daemon's path -----------------------------------------------
def _shard_pages(shard: int, pages: int, key_space: int) -> tuple[list[bytes], list[bytes]]:
    """(warm-up pages, timed pages) of one shard: its own keys (``o<shard>-...``)."""

    def own(bodies: Sequence[bytes]) -> list[bytes]:
        return [b.replace(b'"o-', f'"o{shard}-'.encode()) for b in bodies]

    warm = own(warm_pages(key_space, seed=7 + shard))
    timed = own(steady_pages(pages, seed=100 + shard, key_space=key_space))
    return warm, shift_sequences(timed, SEQ_STEP)


def child(shards: list[int], pages: int, key_space: int) -> None:
    """Prepare (untimed), say ``ready``, wait for a line on stdin, drain the shards (one
    ShardWorker thread each, as the daemon runs them), print the figures as JSON."""
    from bench.redis_pipeline import _card
    from bench.shard import Outcomes, worker_feed
    from viewkeeper.coordination.memory import MemoryStore
    from viewkeeper.projection.registry import ViewRegistry
    from viewkeeper.runtime.pipeline import Pipeline
    from viewkeeper.sinks.redis import RedisSink

    view = make_view(_card, "card")
    registry = ViewRegistry()
    registry.add(view)
    sink = RedisSink("cache", redis_client())
    sink.prepare([view])
    outcomes = Outcomes(Pipeline(registry, {("redis", "cache"): sink}, MemoryStore(), lambda v: 0))
    feeds = []
    for shard in shards:
        warm, timed = _shard_pages(shard, pages, key_space)
        worker_feed(outcomes, TABLE, KEY_NAMES, warm)()  # the cache's state before
        feeds.append(worker_feed(outcomes, TABLE, KEY_NAMES, timed))
    outcomes.applied = outcomes.stale = 0
    print("ready", flush=True)
    sys.stdin.readline()
    c0, t0 = time.process_time(), time.time()
    threads = [threading.Thread(target=feed) for feed in feeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    figures = {
        "records": outcomes.applied + outcomes.stale,
        "stale": outcomes.stale,
        "cpu": time.process_time() - c0,
        "start": t0,
        "end": time.time(),
    }
    print(json.dumps(figures), flush=True)


# --- the parent: N children at once -------------------------------------------------------
def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def drain_recorded(n: int, pages: int, key_space: int) -> dict[str, Any]:
    """One round: N processes over :data:`SHARDS` shards into a flushed Redis."""
    client = redis_client()
    client.flushdb()
    dealt = [list(range(SHARDS))[i::n] for i in range(n)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.processes",
                "--child",
                ",".join(map(str, shards)),
                "--pages",
                str(pages),
                "--key-space",
                str(key_space),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for shards in dealt
    ]
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"a bench child failed to start: {line!r}")
    load = os.getloadavg()[0]
    redis_before = _redis_cpu(client)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"a bench child failed ({p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    redis_cpu = _redis_cpu(client) - redis_before
    records = sum(r["records"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "records": records,
        "wall": wall,
        "rate": rate(records, wall),
        "per_cpu": [rate(r["records"], r["cpu"]) for r in results],
        "redis_cpu_per_record": redis_cpu / records,
        "client_cpu_per_record": sum(r["cpu"] for r in results) / records,
        "load": max(load, os.getloadavg()[0]),
    }


# --- moto end to end ----------------------------------------------------------------------
def drain_moto(n: int, items: int, tmp: Path) -> float:
    """Seconds from the first entry in Redis to the last, ``viewkeeper run --processes n``
    on a moto table of ``items`` items written beforehand."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import vk_env, write_config
    from tests.testbed.dynamo import boto3_client, make_table
    from tests.views_e2e import procs_views

    url = service_url(ENV_DYNAMODB)
    db = boto3_client("dynamodb", url)
    with contextlib.suppress(Exception):  # not there: fine
        db.delete_table(TableName=procs_views.TABLE)
    make_table(db, procs_views.TABLE)
    for lo in range(0, items, 25):
        db.batch_write_item(
            RequestItems={
                procs_views.TABLE: [
                    {"PutRequest": {"Item": {"pk": {"S": f"k{i}"}, "w": {"N": str(i)}}}}
                    for i in range(lo, min(lo + 25, items))
                ]
            }
        )
    client = redis_client()
    client.flushdb()
    config = write_config(
        tmp,
        dynamodb_url=url,
        redis_url=os.environ["VIEWKEEPER_TEST_REDIS_URL"],
        views=["tests.views_e2e.procs_views"],
        tables={procs_views.TABLE: {"starting_position": "TRIM_HORIZON"}},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config), "--processes", str(n)],
        cwd=ROOT,
        env=vk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            count = sum(1 for _ in client.scan_iter(match="pr:*", count=5000))
            if count and first is None:
                first = time.perf_counter()
            if count >= items:
                assert first is not None
                return time.perf_counter() - first
            time.sleep(0.05)
        raise RuntimeError("the moto table was not drained in 300 s")
    finally:
        proc.terminate()
        proc.wait(120)
        db.delete_table(TableName=procs_views.TABLE)


# --- the report ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    pages, key_space, rounds = (5, 2_000, 2) if quick else (15, 5_000, 3)
    best: dict[int, dict[str, Any]] = {}
    for _ in range(rounds):
        for n in (1, 2):
            got = drain_recorded(n, pages, key_space)
            if n not in best or got["rate"] > best[n]["rate"]:
                best[n] = got
    one, two = best[1], best[2]
    rows = [
        Row("recorded pages → Redis, 1 process", one["rate"], "rec/s"),
        Row.compare(
            "recorded pages → Redis, 2 processes (vs 1)",
            two["rate"],
            "rec/s",
            one["rate"],
            TARGET_RATIO,
        ),
        Row("  1 process: records per CPU-second", one["per_cpu"][0], "rec/cpu-s"),
    ]
    for i, per in enumerate(two["per_cpu"]):
        rows.append(Row(f"  2 processes: child {i} records per CPU-second", per, "rec/cpu-s"))
    for n, got in best.items():
        micros = got["redis_cpu_per_record"] * 1e6
        rows.append(Row(f"  Redis CPU per record (N={n})", micros, "µs"))
    ceiling = 1 / min(one["redis_cpu_per_record"], two["redis_cpu_per_record"])
    rows.append(Row("  ceiling on any host: 1 / Redis CPU per record", ceiling, "rec/s"))
    # what two free cores could do: every record costs its client CPU plus Redis's
    per_record = one["client_cpu_per_record"] + one["redis_cpu_per_record"]
    rows.append(
        Row("  2-core ceiling: 2 / (client + Redis CPU per record)", 2 / per_record, "rec/s")
    )
    rows.append(
        Row.compare("  that ceiling over 1 process", 2 / per_record, "rec/s", one["rate"], None)
    )
    loads = [got["load"] for got in best.values()]
    rows.append(Row("  machine load (1-min average, other runs included)", max(loads), ""))
    items = 3_000 if quick else 8_000
    with tempfile.TemporaryDirectory() as tmp:
        moto = {n: float("inf") for n in (1, 2)}
        for _ in range(1 if quick else 2):
            for n in (1, 2):
                moto[n] = min(moto[n], drain_moto(n, items, Path(tmp)))
    r1, r2 = rate(items, moto[1]), rate(items, moto[2])
    rows.append(Row("moto end to end (1 shard), 1 process", r1, "rec/s"))
    rows.append(Row.compare("moto end to end (1 shard), 2 processes (vs 1)", r2, "rec/s", r1, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", default=None)
    parser.add_argument("--pages", type=int, default=15)
    parser.add_argument("--key-space", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child is not None:
        child([int(s) for s in args.child.split(",")], args.pages, args.key_space)
        return
    from bench.common import print_table

    print_table(run(args))


if __name__ == "__main__":
    main()
