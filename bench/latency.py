"""Latency, end to end through moto: ``put_item`` returns → the value is readable in Redis.

A ``viewkeeper run`` daemon (a subprocess: its own interpreter and GIL, as in production;
default ``poll_interval`` 0.25 s, leases and checkpoints in a coordination table on moto)
tails a moto table while a writer thread here puts items with boto3 at :data:`RATE`/s for
:data:`SECONDS` s. The writer records ``t0`` for each item when ``put_item`` returns; a
reader thread polls Redis every ~2 ms with one pipeline of EXISTS for every key not seen yet, and
records ``t1`` on first sight. Latency = ``t1 - t0`` (clamped at 0). Targets: p50 ≤
:data:`TARGET_P50` ms, p99 ≤ :data:`TARGET_P99` ms.

Moto is in the path twice (the write, and GetRecords) and shares this 2-core machine with
the daemon, Redis and this process, so the module also reports moto's own time per call
from here: ``put_item`` as the writer saw it, and an empty GetRecords round trip at the end
of the stream (what the daemon pays on every poll).

The view is declared in this module (``views: [bench.latency]``): the daemon imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Row
from viewkeeper import Value, redis_view

TABLE = "bench-latency"
RATE = 200.0
SECONDS = 20.0
TARGET_P50 = 300.0
TARGET_P99 = 1000.0
REPO = Path(__file__).resolve().parent.parent


@redis_view(table=TABLE, redis="cache")
def latency_probe(item: dict[str, Any]) -> Value:
    return Value(f"lat:{item['pk']}", {"n": item["n"], "payload": item["payload"]})


def _boto3(service: str, url: str) -> Any:
    import boto3
    from botocore.config import Config

    make: Any = boto3.client
    return make(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=4),
    )


def _make_table(db: Any) -> None:
    with contextlib.suppress(db.exceptions.ResourceNotFoundException):
        db.delete_table(TableName=TABLE)
    db.create_table(
        TableName=TABLE,
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    db.get_waiter("table_exists").wait(TableName=TABLE, WaiterConfig={"Delay": 1})


def _config(folder: Path, dynamodb_url: str, redis_url: str) -> Path:
    import yaml

    cfg = {
        "aws": {"region": "us-east-1", "endpoint_url": dynamodb_url},
        "tables": {TABLE: {"starting_position": "TRIM_HORIZON"}},
        "views": ["bench.latency"],
        "redis": {"cache": {"url": redis_url}},
        "coordination": {"table": f"bench-coord-{uuid.uuid4().hex[:8]}"},
        "metrics": {"port": None},
    }
    path = folder / "viewkeeper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _put(db: Any, pk: str, n: int) -> None:
    db.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": pk},
            "n": {"N": str(n)},
            "status": {"S": "PAID"},
            "payload": {"S": "x" * 200},
        },
    )


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _measure(db: Any, redis: Any, count: int, rate: float) -> tuple[list[float], list[float]]:
    """(latencies in s, put_item call times in s) for ``count`` items written at ``rate``."""
    t0: list[float | None] = [None] * count
    t1: list[float | None] = [None] * count
    puts: list[float] = []
    written = threading.Event()
    errors: list[BaseException] = []
    run_id = uuid.uuid4().hex[:6]

    def writer() -> None:
        try:
            start = time.perf_counter()
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                began = time.perf_counter()
                _put(db, f"{run_id}-{i}", i)
                t0[i] = done = time.perf_counter()
                puts.append(done - began)
        except BaseException as exc:
            errors.append(exc)
        finally:
            written.set()

    def reader() -> None:
        pending: list[int] = []
        nxt = 0
        deadline: float | None = None
        while True:
            while nxt < count and t0[nxt] is not None:
                pending.append(nxt)
                nxt += 1
            if pending:
                pipe = redis.pipeline(transaction=False)
                for i in pending:
                    pipe.exists(f"lat:{run_id}-{i}")
                now_seen = pipe.execute()
                now = time.perf_counter()
                still = []
                for i, hit in zip(pending, now_seen, strict=True):
                    if hit:
                        t1[i] = now
                    else:
                        still.append(i)
                pending = still
            if written.is_set():
                if nxt >= count and not pending:
                    return
                deadline = deadline or time.perf_counter() + 30
                if time.perf_counter() > deadline:
                    return
            time.sleep(0.002)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    missing = sum(1 for x in t1 if x is None)
    if missing:
        raise AssertionError(f"{missing} of {count} items never became visible in Redis")
    lat = [max(0.0, b - a) for a, b in zip(t0, t1, strict=True) if a is not None and b is not None]
    return lat, puts


def _get_records_ms(url: str) -> float:
    """p50 of an empty GetRecords round trip at the end of the stream (viewkeeper's client)."""
    import boto3

    from viewkeeper.stream.http import HttpStreamClient

    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client = HttpStreamClient("us-east-1", url, session)
    arn = client.describe_table(TABLE).stream_arn
    assert arn is not None
    shard = client.list_shards(arn)[0].shard_id
    it: str | None = client.get_shard_iterator(arn, shard, "LATEST")
    times = []
    for _ in range(30):
        assert it is not None
        t = time.perf_counter()
        page = client.get_records(it)
        times.append(time.perf_counter() - t)
        it = page.next_iterator
    client.close()
    return statistics.median(times) * 1000


def run(args: argparse.Namespace) -> list[Row]:
    from bench.redis_pipeline import ENV_DYNAMODB, ENV_REDIS, redis_client, service_url

    quick = bool(getattr(args, "quick", False))
    seconds = 5.0 if quick else SECONDS
    dynamodb_url = service_url(ENV_DYNAMODB)
    redis_url = service_url(ENV_REDIS)
    db = _boto3("dynamodb", dynamodb_url)
    redis = redis_client()
    redis.flushall()
    _make_table(db)
    with tempfile.TemporaryDirectory(prefix="vk-bench-latency-") as tmp:
        folder = Path(tmp)
        config = _config(folder, dynamodb_url, redis_url)
        env = dict(os.environ)
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        log_path = folder / "daemon.log"
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            # Ready when a probe written now shows up in Redis.
            deadline = time.monotonic() + 90
            _put(db, "probe", -1)
            while not redis.exists("lat:probe"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the viewkeeper daemon did not apply a probe item; its log:\n"
                        + log_path.read_text(errors="replace")[-3000:]
                    )
                time.sleep(0.02)
            lat, puts = _measure(db, redis, int(RATE * seconds), RATE)
            get_ms = _get_records_ms(dynamodb_url)
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    with contextlib.suppress(Exception):
        db.delete_table(TableName=TABLE)
    redis.flushall()
    redis.close()
    p50, p99, worst = (_pct(lat, 50) * 1000, _pct(lat, 99) * 1000, max(lat) * 1000)
    n = len(lat)
    return [
        Row(f"latency: put_item -> Redis p50, {n} items at {RATE:.0f}/s (target <= "
            f"{TARGET_P50:.0f} ms)", p50, "ms", met=p50 <= TARGET_P50),
        Row(f"latency: p99 (target <= {TARGET_P99:.0f} ms)", p99, "ms", met=p99 <= TARGET_P99),
        Row("latency: max", worst, "ms"),
        Row("latency: moto put_item call p50 (the writer's view)",
            statistics.median(puts) * 1000, "ms"),
        Row("latency: moto empty GetRecords round trip p50", get_ms, "ms"),
    ]  # fmt: skip


if __name__ == "__main__":  # .venv/bin/python -m bench.latency [--quick]
    from bench.common import print_table

    print_table(run(argparse.Namespace(quick="--quick" in sys.argv)))
