"""The Lambda handler: the same views on a DynamoDB Streams event source, with
ReportBatchItemFailures — exactly as safe as the daemon (#13): generations read per
invocation, the coordination table created on a cold start, malformed records
dead-lettered, never a batch lost."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import redis_view_keys, write_config
from tests.testbed import free_port
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.ops import lambda_handler
from viewkeeper.ops.lambda_handler import handle_event, table_of
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.pipeline import Pipeline
from viewkeeper.sinks.redis import RedisSink

TABLE = "e2e-orders"
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


# --- the handler as Lambda runs it: one runtime per container, many invocations ------------
@pytest.fixture
def lambda_config(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    dynamodb_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """A config for a fresh container: a coordination table that does not exist yet."""
    make_table(dynamodb, TABLE, hash_key="order_id")
    cfg = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.redis_only"],
    )
    monkeypatch.setenv("VIEWKEEPER_CONFIG", str(cfg))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(lambda_handler, "_RUNTIME", None)  # a cold container
    return cfg


def _item(order_id: str, status: str) -> dict[str, Any]:
    return {
        "order_id": {"S": order_id},
        "customer_id": {"S": "c1"},
        "status": {"S": status},
        "total": {"N": "2.5"},
        "created_at": {"N": "7"},
        "blob": {"B": base64.b64encode(b"\x00\x01").decode()},
    }


def test_a_warm_lambda_container_applies_updates_after_a_rebuild(
    lambda_config: Path, dynamodb: Any, redis_client: Any
) -> None:
    """Issue #13 case 2: the handler read the generations once per container and never took
    part in the handshake; after a rebuild every record of a warm container went out as
    (G-1, seq), stale against the scan's (G, 0), and the batch still succeeded: the update
    was lost. Now each invocation reads the generations after its records were read."""
    from viewkeeper.app import App
    from viewkeeper.runtime.rebuild import rebuild

    dynamodb.put_item(TableName=TABLE, Item=_item("o1", "new"))
    first = {"Records": [lambda_record("5" * 21 + "1", "o1", "new")]}
    assert lambda_handler.handler(first, None) == {"batchItemFailures": []}
    app = App.from_file(str(lambda_config))
    try:
        rebuild(
            list(app.registry),
            app.registry,
            app.client,
            app.store,
            app.pipeline,
            app.rebuild_settings(segments=1, handshake_timeout=5),
            out=io.StringIO(),
        )
    finally:
        app.close()
    assert app.store.generations() == {"card": 1}
    dynamodb.put_item(TableName=TABLE, Item=_item("o1", "paid"))  # after the scan read o1
    second = {"Records": [lambda_record("5" * 21 + "2", "o1", "paid", "MODIFY")]}
    assert lambda_handler.handler(second, None) == {"batchItemFailures": []}
    assert redis_view_keys(redis_client)["order:o1"] == '{"status":"paid","total":2.5}'


def test_a_cold_lambda_start_creates_the_coordination_table(
    lambda_config: Path, dynamodb: Any, redis_client: Any
) -> None:
    """#13: the first invocation raised ResourceNotFoundException although
    coordination.create_if_missing defaults to true."""
    import yaml

    table = yaml.safe_load(lambda_config.read_text())["coordination"]["table"]
    with pytest.raises(dynamodb.exceptions.ResourceNotFoundException):
        dynamodb.describe_table(TableName=table)
    event = {"Records": [lambda_record("6" * 22, "o1", "new")]}
    assert lambda_handler.handler(event, None) == {"batchItemFailures": []}
    assert dynamodb.describe_table(TableName=table)["Table"]["TableStatus"] == "ACTIVE"
    assert "order:o1" in redis_view_keys(redis_client)


def test_a_record_with_a_malformed_event_source_arn_is_dead_lettered_alone(
    redis_client: redis.Redis,
) -> None:
    """#13: a record whose eventSourceARN is not a stream ARN failed the whole batch while
    other malformed records were dead-lettered. It is dead-lettered like them now."""
    store = MemoryStore()
    pipe = lambda_pipeline(redis_client, store)
    odd = lambda_record("7" * 21 + "2", "o2", "new")
    odd["eventSourceARN"] = "arn:aws:kinesis:us-east-1:1:stream/x"
    event = {
        "Records": [
            lambda_record("7" * 21 + "1", "o1", "new"),
            odd,
            lambda_record("7" * 21 + "3", "o3", "new"),
        ]
    }
    assert handle_event(event, pipe, lambda t: ("order_id",)) == {"batchItemFailures": []}
    assert set(redis_view_keys(redis_client)) == {"order:o1", "order:o3"}
    (dl,) = store.list_deadletters()
    assert dl.sequence == "7" * 21 + "2" and dl.table == TABLE and "eventSourceARN" in dl.error
    assert dl.record == odd
