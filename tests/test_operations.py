"""Operating the daemon: systemd notification and drain on SIGTERM, metrics, the Lambda
handler — against moto, the real Redis and real processes."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.helpers import REPO, redis_view_keys, vk_env, write_config
from tests.testbed import free_port
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.ops.lambda_handler import handle_event, table_of
from viewkeeper.pipeline import Pipeline
from viewkeeper.projection.registry import load_views
from viewkeeper.sinks.redis import RedisSink

TABLE = "e2e-orders"


@pytest.fixture
def config(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    dynamodb_url: str,
    redis_url: str,
) -> Path:
    make_table(dynamodb, TABLE, hash_key="order_id")
    return write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.redis_only"],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
    )


def put(db: Any, order_id: str, status: str = "new", customer: str = "alice") -> None:
    db.put_item(
        TableName=TABLE,
        Item={
            "order_id": {"S": order_id},
            "customer_id": {"S": customer},
            "status": {"S": status},
            "total": {"N": "5"},
            "created_at": {"N": "1"},
        },
    )


def start_daemon(config: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config)],
        cwd=REPO,
        env=vk_env() | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_run_speaks_sd_notify_and_drains_on_sigterm(
    config: Path, dynamodb: Any, redis_client: Any, tmp_path: Path, dynamodb_url: str
) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    put(dynamodb, "o1")
    proc = start_daemon(config, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000")
    try:
        got: list[str] = []
        while not any("WATCHDOG=1" in m for m in got) or not any("READY=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=" in ready and "shards" in ready
        wait_for(lambda: "order:o1" in redis_view_keys(redis_client))
        for i in range(2, 40):
            put(dynamodb, f"o{i}")
        proc.send_signal(signal.SIGTERM)
        while True:
            msg = sock.recv(4096).decode()
            if "STOPPING=1" in msg:
                break
        assert proc.wait(30) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    out = proc.stdout.read() if proc.stdout else ""
    assert "stopped cleanly" in out
    table = yaml.safe_load(config.read_text())["coordination"]["table"]
    store = DynamoDBStore(dynamodb, table)
    (lease,) = store.list_leases(TABLE)
    assert lease.owner is None  # released
    # what was read before the signal is applied and checkpointed; the rest is read next time
    subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config), "--until-caught-up"],
        cwd=REPO,
        env=vk_env(),
        check=True,
        timeout=60,
        capture_output=True,
    )
    keys = redis_view_keys(redis_client)
    assert {f"order:o{i}" for i in range(1, 40)} <= set(keys)


def test_metrics_endpoint_counts_records_and_listens_on_loopback(
    config: Path, dynamodb: Any, redis_client: Any
) -> None:
    port = free_port()
    cfg = yaml.safe_load(config.read_text())
    cfg["metrics"] = {"port": port}
    config.write_text(yaml.safe_dump(cfg))
    for i in range(5):
        put(dynamodb, f"m{i}")
    proc = start_daemon(config)
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped() -> str:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    return str(resp.read().decode())
            except OSError:
                return ""

        wanted = (
            'viewkeeper_records_total{outcome="applied",view="card"} 5.0',
            "viewkeeper_leases_held 1.0",
            # the page's records are counted before its batch time and lag are recorded, so
            # a scrape may fall between them: wait for all of them, not for the first
            "viewkeeper_shard_lag_seconds{",
            "viewkeeper_batch_duration_seconds_count",
        )
        deadline = time.monotonic() + 20
        while True:
            text = scraped()
            missing = [line for line in wanted if line not in text]
            if not missing:
                break
            assert time.monotonic() < deadline, f"never scraped together: {missing}"
            time.sleep(0.05)
        listeners = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{port:04X}" in listeners  # bound to 127.0.0.1, not 0.0.0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# --- Lambda -------------------------------------------------------------------------------
ARN = f"arn:aws:dynamodb:us-east-1:123456789012:table/{TABLE}/stream/2026-11-27T00:00:00.000"


def lambda_record(seq: str, order_id: str, status: str, event: str = "INSERT") -> dict[str, Any]:
    image = {
        "order_id": {"S": order_id},
        "customer_id": {"S": "c1"},
        "status": {"S": status},
        "total": {"N": "2.5"},
        "created_at": {"N": "7"},
        "blob": {"B": base64.b64encode(b"\x00\x01").decode()},
    }
    body: dict[str, Any] = {
        "ApproximateCreationDateTime": 1764201600,
        "Keys": {"order_id": {"S": order_id}},
        "SequenceNumber": seq,
        "SizeBytes": 100,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if event != "REMOVE":
        body["NewImage"] = image
    return {
        "eventID": seq,
        "eventName": event,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": body,
        "eventSourceARN": ARN,
    }


def lambda_pipeline(client: Any, store: Any) -> Pipeline:
    registry = load_views(["tests.views_e2e.redis_only"])
    sink = RedisSink("cache", client, retry_seconds=0.5)
    return Pipeline(registry, {("redis", "cache"): sink}, store, lambda v: 0)


def test_table_of_reads_the_stream_arn() -> None:
    assert table_of(ARN) == TABLE
    with pytest.raises(ValueError, match="not a DynamoDB stream ARN"):
        table_of("arn:aws:kinesis:x")


def test_lambda_handler_applies_an_event_and_dead_letters_a_bad_record(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VK_TEST_BOOM", "1")
    store = MemoryStore()
    pipe = lambda_pipeline(redis_client, store)
    event = {
        "Records": [
            lambda_record("1" * 21 + "1", "o1", "new"),
            lambda_record("1" * 21 + "2", "o2", "boom"),
            lambda_record("1" * 21 + "3", "o1", "paid", "MODIFY"),
        ]
    }
    assert handle_event(event, pipe, lambda t: ("order_id",)) == {"batchItemFailures": []}
    assert redis_view_keys(redis_client)["order:o1"] == '{"status":"paid","total":2.5}'
    (dl,) = store.list_deadletters()
    assert dl.item_key == "o2" and dl.sequence == "1" * 21 + "2"


def test_lambda_reports_the_first_record_when_a_sink_is_down() -> None:
    down = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    pipe = lambda_pipeline(down, MemoryStore())
    seqs = ["2" * 22, "2" * 21 + "3"]
    event = {
        "Records": [
            lambda_record(seqs[0], "o1", "new"),
            lambda_record(seqs[1], "o1", "x", "REMOVE"),
        ]
    }
    result = handle_event(event, pipe, lambda t: ("order_id",))
    assert result == {"batchItemFailures": [{"itemIdentifier": seqs[0]}]}


def test_lambda_dead_letters_a_malformed_record_instead_of_dropping_it(
    redis_client: redis.Redis,
) -> None:
    """A malformed record is dead-lettered (raw record, error, sequence) like in the daemon,
    and the rest of the batch is applied: nothing dropped, nothing retried forever."""
    store = MemoryStore()
    pipe = lambda_pipeline(redis_client, store)
    no_keys = lambda_record("3" * 22, "o1", "new")
    del no_keys["dynamodb"]["Keys"]
    unknown_type = lambda_record("3" * 21 + "4", "o2", "new")
    unknown_type["dynamodb"]["NewImage"]["x"] = {"X": "1"}
    no_sequence = lambda_record("3" * 21 + "5", "o3", "new")
    del no_sequence["dynamodb"]["SequenceNumber"]
    event = {
        "Records": [
            lambda_record("3" * 21 + "1", "o0", "new"),
            no_keys,
            unknown_type,
            no_sequence,
            lambda_record("3" * 21 + "6", "o4", "paid"),
        ]
    }
    assert handle_event(event, pipe, lambda t: ("order_id",)) == {"batchItemFailures": []}
    keys = redis_view_keys(redis_client)
    assert set(keys) == {"order:o0", "order:o4"}
    letters = {d.sequence: d for d in store.list_deadletters()}
    assert set(letters) == {"3" * 22, "3" * 21 + "4", "0"}  # "0": it has no sequence
    assert "Keys" in letters["3" * 22].error and letters["3" * 22].item_key == "?"
    assert "'X'" in letters["3" * 21 + "4"].error and letters["3" * 21 + "4"].item_key == "o2"
    assert "SequenceNumber" in letters["0"].error
    for dl, raw in zip(
        (letters["3" * 22], letters["3" * 21 + "4"], letters["0"]),
        (no_keys, unknown_type, no_sequence),
        strict=True,
    ):
        assert (dl.view, dl.table) == ("card", TABLE)
        assert dl.record == raw  # kept for inspection and replay


def test_lambda_fails_the_batch_on_a_malformed_record_of_no_known_table() -> None:
    """When no record of the event says which table it is from, a malformed record cannot be
    dead-lettered per view: the batch fails from its first record, so Lambda keeps it."""
    pipe = lambda_pipeline(redis.Redis(port=free_port()), MemoryStore())
    bad = lambda_record("3" * 22, "o1", "new")
    del bad["dynamodb"]["Keys"]
    del bad["eventSourceARN"]
    result = handle_event({"Records": [bad]}, pipe, lambda t: ("order_id",))
    assert result == {"batchItemFailures": [{"itemIdentifier": "3" * 22}]}
