"""Change-log views end to end: moto's DynamoDB Streams, the real Redis and OpenSearch, the real
``viewkeeper run`` killed with -9 during a random workload, and after some kills the
checkpoint moved back (what a kill between the append and the checkpoint leaves: records
appended and read again). Afterwards the Redis stream and the OpenSearch index hold exactly
one entry per record of moto's stream (read back with boto3), none twice, each item's changes
in stream order;
``rebuild`` refuses the view."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import ClientError

from tests.helpers import REPO, vk, vk_env, write_config
from tests.testbed.dynamo import boto3_client
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.model import Lease, LeaseState

TABLE = "e2e-log"
STREAM = "log:events"


def stream_records(dynamodb_url: str, stream_arn: str) -> list[tuple[str, str, str]]:
    """(item, event, sequence) of every record moto's stream holds, in order."""
    streams = boto3_client("dynamodbstreams", dynamodb_url)
    out = []
    shards = streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"]
    for shard in shards:
        it = streams.get_shard_iterator(
            StreamArn=stream_arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while it:
            page = streams.get_records(ShardIterator=it, Limit=1000)
            for r in page["Records"]:
                d = r["dynamodb"]
                out.append((d["Keys"]["pk"]["S"], r["eventName"], d["SequenceNumber"]))
            if not page["Records"]:
                break
            it = page.get("NextShardIterator")
    return out


def leases(store: DynamoDBStore) -> list[Lease]:
    try:
        return store.list_leases(TABLE)
    except ClientError:  # the daemon has not made the coordination table yet
        return []


def rewind(store: DynamoDBStore, rng: random.Random, read: list[str]) -> int:
    """Move the shard's checkpoint back to a record a few records before it (1 when moved);
    ``read``: the stream's sequence numbers, in order."""
    found = leases(store)
    if not found or found[0].checkpoint is None or found[0].checkpoint not in read:
        return 0
    at = read.index(found[0].checkpoint)
    back = read[max(0, at - rng.randrange(1, 40))]
    store.reset_lease(TABLE, found[0].shard_id, back, LeaseState.ACTIVE)
    return 1


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config)],
        cwd=REPO,
        env=vk_env(),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_kill_9_during_a_random_workload_appends_each_record_exactly_once_in_item_order(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    os_client: Any,
    os_prefix: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
) -> None:
    _, stream_arn = make_table(dynamodb, TABLE)
    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.changelog_views"],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
        worker={"poll_interval": 0.02, "lease_duration": 3.0, "batch_size": 7},
        opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
    )
    rng = random.Random(20261202)
    log = tmp_path / "daemon.log"
    coordination = yaml.safe_load(config.read_text())["coordination"]["table"]
    store = DynamoDBStore(dynamodb, coordination)
    daemon = start(config, log)
    dynamodb.put_item(TableName=TABLE, Item={"pk": {"S": "k0"}, "n": {"N": "0"}})
    deadline = time.monotonic() + 60
    while not leases(store):  # the daemon is up and reading
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    kills = rewound = 0
    try:
        for i in range(240):
            pk = f"k{rng.randrange(12)}"
            if rng.random() < 0.2:
                dynamodb.delete_item(TableName=TABLE, Key={"pk": {"S": pk}})
            else:
                item = {"pk": {"S": pk}, "n": {"N": str(i)}}
                dynamodb.put_item(TableName=TABLE, Item=item)
            if i % 60 == 59:  # kill -9 mid-stream, restart at once
                time.sleep(rng.uniform(0.05, 0.6))
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(10)
                kills += 1
                read = [seq for _, _, seq in stream_records(dynamodb_url, stream_arn)]
                rewound += rewind(store, rng, read)
                daemon = start(config, log)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
    assert kills == 4 and rewound >= 3
    # a last run takes the (expired) lease and catches up
    time.sleep(3.5)
    done = vk("run", "-c", str(config), "--until-caught-up", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    records = stream_records(dynamodb_url, stream_arn)
    entries = [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in redis_client.xrange(STREAM)
    ]
    got = Counter(e["seq"] for e in entries)
    twice = [seq for seq, n in got.items() if n > 1]
    assert not twice, f"appended more than once: {twice[:10]}"
    assert set(got) == {seq for _, _, seq in records}, log.read_text()[-3000:]
    for pk in {r[0] for r in records}:
        wanted = [(event, seq) for item, event, seq in records if item == pk]
        seen = [(e["event"], e["seq"]) for e in entries if e["pk"] == pk]
        assert seen == wanted, pk
    alias = f"{os_prefix}log-audit"
    os_client.indices.refresh(index=alias)
    hits = os_client.search(index=alias, body={"size": 10000, "sort": [{"_vk.seq_sort": "asc"}]})[
        "hits"
    ]["hits"]
    assert len(hits) == len(records)  # one document per record
    assert {h["_id"] for h in hits} == {seq for _, _, seq in records}
    for pk in {r[0] for r in records}:
        wanted = [(event, seq) for item, event, seq in records if item == pk]
        seen = [(h["_source"]["event"], h["_id"]) for h in hits if h["_source"]["pk"] == pk]
        assert seen == wanted, pk
    daemon_log = log.read_text()
    assert "Traceback" not in daemon_log, daemon_log[-3000:]

    for view in ("log_events", "log_audit"):
        refused = vk("rebuild", "-c", str(config), view)
        assert refused.returncode != 0
        assert "a change-log view cannot be rebuilt" in refused.stderr
