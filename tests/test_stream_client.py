"""HttpStreamClient end to end: against moto's server (the wire protocol) and against a tiny
canned-response server (the error mapping and retries moto cannot produce: moto answers
every error it does not model with an HTML 500, ARCHITECTURE.md § Test bed)."""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import boto3
import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer, TypeSerializer

from tests.helpers import Canned
from viewkeeper.stream.client import (
    StreamClient,
    gc_paused,
    parse_records,
    parse_stream,
    parse_table,
)
from viewkeeper.stream.errors import (
    AccessDeniedError,
    ConnectionFailedError,
    ExpiredIteratorError,
    ResourceNotFoundError,
    ServiceError,
    StreamError,
    ThrottlingError,
    TrimmedDataAccessError,
    ValidationError,
)
from viewkeeper.stream.http import HttpStreamClient
from viewkeeper.stream.records import ChangeRecord

ACCESS_KEY = "AKIAVIEWKEEPERTEST01"
SECRET_KEY = "s3cr3t/viewkeeper+never-log-this-0123456789"
TOKEN = "IQoJb3JpZ2luX2VjEViewkeeperSessionTokenNeverLogged"


def session(token: str | None = TOKEN) -> boto3.Session:
    return boto3.Session(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=token,
        region_name="us-east-1",
    )


def no_secrets(text: str) -> None:
    for secret in (SECRET_KEY, TOKEN, "Signature=", "Credential="):
        assert secret not in text, f"{secret!r} leaked into {text!r}"


# --- against moto ------------------------------------------------------------------------


@pytest.fixture
def client(dynamodb_url: str) -> Iterator[HttpStreamClient]:
    c = HttpStreamClient(
        "us-east-1", dynamodb_url, session(), max_attempts=2, backoff_initial=0.01, backoff_max=0.05
    )
    yield c
    c.close()


def boto3_item(item: dict[str, Any]) -> dict[str, Any]:
    ser = TypeSerializer()
    return {k: ser.serialize(v) for k, v in item.items()}


def plain(value: Any) -> Any:
    """TypeDeserializer's values, with Binary as bytes: comparable with ours."""
    if isinstance(value, Binary):
        return bytes(cast(Any, value).value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, set):
        return {plain(v) for v in value}
    return value


def read_all(
    client: StreamClient,
    arn: str,
    how: str = "TRIM_HORIZON",
    sequence: str | None = None,
    limit: int = 1000,
) -> list[ChangeRecord]:
    (shard,) = client.list_shards(arn)
    iterator: str | None = client.get_shard_iterator(arn, shard.shard_id, how, sequence)
    out: list[ChangeRecord] = []
    while iterator is not None:
        page = client.get_records(iterator, limit)
        out += page.records
        if not page.records:
            break
        iterator = page.next_iterator
    return out


ITEM = {
    "pk": "o-1",
    "sk": 3,
    "s": "héllo",
    "n_int": 42,
    "n_dec": Decimal("12.50"),
    "n_neg": Decimal("-0.001"),
    "n_big": 12345678901234567890123456789012345678,
    "b": b"\x00\x01\xff",
    "ss": {"a", "b"},
    "ns": {1, Decimal("2.5")},
    "bs": {b"x", b"y"},
    "m": {"nested": {"deep": ["x", 1, None, True]}},
    "l": [Decimal("1.5"), "two", {"three": 3}],
    "null": None,
    "bool": False,
}


@pytest.mark.dynamodb
def test_describe_table_and_list_shards(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, arn = make_table(dynamodb, table_name, "pk", "sk", range_type="N")
    info = client.describe_table(name)
    assert (info.name, info.key_names, info.stream_arn) == (name, ("pk", "sk"), arn)
    assert info.stream_view_type == "NEW_AND_OLD_IMAGES" and info.status == "ACTIVE"
    assert info.item_count == 0
    (shard,) = client.list_shards(arn)
    assert shard.parent_shard_id is None and shard.starting_sequence.isdigit()
    assert shard.ending_sequence is None and not shard.closed  # moto: one shard, never closes
    page = client.describe_stream(arn)
    assert page.status == "ENABLED" and page.last_evaluated_shard_id is None


@pytest.mark.dynamodb
def test_a_table_without_stream_has_no_arn(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, _ = make_table(dynamodb, table_name, stream=False)
    info = client.describe_table(name)
    assert info.stream_arn is None and info.stream_view_type is None


@pytest.mark.dynamodb
def test_insert_modify_remove_images_equal_what_boto3_wrote(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, arn = make_table(dynamodb, table_name, "pk", "sk", range_type="N")
    key = {"pk": {"S": "o-1"}, "sk": {"N": "3"}}
    started = time.time()
    dynamodb.put_item(TableName=name, Item=boto3_item(ITEM))
    changed = dict(ITEM, s="changed", n_int=43)
    del changed["bs"]
    dynamodb.put_item(TableName=name, Item=boto3_item(changed))
    dynamodb.delete_item(TableName=name, Key=key)

    records = read_all(client, arn)
    assert [r.event for r in records] == ["INSERT", "MODIFY", "REMOVE"]
    ins, mod, rem = records
    des = TypeDeserializer()
    written = plain({k: des.deserialize(v) for k, v in boto3_item(ITEM).items()})
    assert ins.new_image == written == ITEM
    assert ins.keys == {"pk": "o-1", "sk": 3}
    assert type(ins.new_image["n_int"]) is int and type(ins.new_image["n_dec"]) is Decimal
    assert mod.old_image == ITEM and mod.new_image == changed
    assert rem.new_image is None and rem.old_image == changed
    numbers = [int(r.sequence) for r in records]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    assert all(len(r.sequence) >= 21 for r in records)
    assert all(started - 5 <= r.created_at <= time.time() + 5 for r in records)


@pytest.mark.dynamodb
def test_iterator_positions_and_page_limit(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, arn = make_table(dynamodb, table_name)
    for i in range(5):
        dynamodb.put_item(TableName=name, Item={"pk": {"S": f"k{i}"}})
    everything = read_all(client, arn)
    assert [r.keys["pk"] for r in everything] == [f"k{i}" for i in range(5)]
    second = everything[1].sequence
    at = read_all(client, arn, "AT_SEQUENCE_NUMBER", second)
    after = read_all(client, arn, "AFTER_SEQUENCE_NUMBER", second)
    assert [r.sequence for r in at] == [r.sequence for r in everything[1:]]
    assert [r.sequence for r in after] == [r.sequence for r in everything[2:]]

    (shard,) = client.list_shards(arn)
    latest = client.get_shard_iterator(arn, shard.shard_id, "LATEST")
    first = client.get_records(client.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON"), 2)
    assert len(first.records) == 2 and first.next_iterator is not None
    again = client.read_records(client.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON"), 2)
    assert again.count == 2 and again.next_iterator is not None
    same = [(r.event, r.sequence, r.keys, r.new_image) for r in again.decode().records]
    assert same == [(r.event, r.sequence, r.keys, r.new_image) for r in first.records]
    dynamodb.put_item(TableName=name, Item={"pk": {"S": "late"}})
    assert [r.keys["pk"] for r in client.get_records(latest).records] == ["late"]


@pytest.mark.dynamodb
def test_errors_are_typed(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, arn = make_table(dynamodb, table_name)
    with pytest.raises(ResourceNotFoundError) as info:
        client.describe_table(name + "-missing")
    assert info.value.code == "ResourceNotFoundException" and info.value.status == 400
    assert info.value.operation == "DescribeTable" and info.value.request_id
    with pytest.raises(ResourceNotFoundError):
        client.scan(name + "-missing", 0, 1)
    # moto answers a bad iterator or shard with an HTML 500 (AWS: ValidationException)
    with pytest.raises(ServiceError) as bad:
        client.get_records("not-an-iterator")
    assert bad.value.status == 500 and "Internal Server Error" in str(bad.value)
    with pytest.raises(ServiceError):
        client.get_shard_iterator(arn, "shardId-nope", "TRIM_HORIZON")
    # checked before anything is sent
    with pytest.raises(ValidationError, match="iterator type 'OLDEST'"):
        client.get_shard_iterator(arn, "x", "OLDEST")
    with pytest.raises(ValidationError, match="needs a sequence number"):
        client.get_shard_iterator(arn, "x", "AT_SEQUENCE_NUMBER")
    with pytest.raises(ValidationError, match="limit 0"):
        client.get_records("x", 0)


@pytest.mark.dynamodb
def test_scan_with_segments(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, _ = make_table(dynamodb, table_name, "pk", "sk", range_type="N")
    for i in range(30):
        row = {"pk": f"p{i % 7}", "sk": i, "v": Decimal(i) / 4, "tags": {f"t{i}"}}
        dynamodb.put_item(TableName=name, Item=boto3_item(row))
    seen: list[tuple[str, int]] = []
    for segment in range(3):
        start: dict[str, Any] | None = None
        while True:
            page = client.scan(name, segment, 3, start, limit=4)
            assert len(page.items) <= 4
            assert page.consumed_capacity is not None
            for item in page.items:
                assert item["v"] == Decimal(item["sk"]) / 4 and item["tags"] == {f"t{item['sk']}"}
                seen.append((item["pk"], item["sk"]))
            start = page.last_evaluated_key
            if not start:
                break
            assert set(start) == {"pk", "sk"} and isinstance(start["sk"], int)
    assert sorted(seen) == sorted((f"p{i % 7}", i) for i in range(30))
    assert len(client.scan(name, 0, 1).items) == 30


@pytest.mark.dynamodb
def test_one_client_from_many_threads(
    client: HttpStreamClient, dynamodb: Any, make_table: Any, table_name: str
) -> None:
    name, arn = make_table(dynamodb, table_name)
    for i in range(20):
        dynamodb.put_item(TableName=name, Item={"pk": {"S": f"k{i}"}})
    (shard,) = client.list_shards(arn)
    results: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                it = client.get_shard_iterator(arn, shard.shard_id, "TRIM_HORIZON")
                results.append(len(client.get_records(it).records))
                client.describe_table(name)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [20] * 40


@pytest.mark.dynamodb
def test_credentials_never_appear_in_errors_or_logs(
    dynamodb_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = HttpStreamClient(
        "us-east-1",
        dynamodb_url,
        session(),
        max_attempts=2,
        backoff_initial=0.001,
        backoff_max=0.001,
    )
    refused = HttpStreamClient(
        "us-east-1",
        "http://127.0.0.1:9",
        session(),
        max_attempts=2,
        backoff_initial=0.001,
        backoff_max=0.001,
    )
    failures: list[StreamError] = []
    for call in (
        lambda: client.describe_table("no-such-table"),
        lambda: client.get_records("not-an-iterator"),
        lambda: refused.describe_table("x"),
    ):
        with pytest.raises(StreamError) as info:
            call()
        failures.append(info.value)
    assert isinstance(failures[2], ConnectionFailedError)
    for exc in failures:
        no_secrets(str(exc))
        no_secrets(repr(exc))
        assert ACCESS_KEY not in str(exc)
    no_secrets(repr(client))
    no_secrets(caplog.text)
    assert "retrying" in caplog.text  # the retries were logged, without secrets


# --- against a canned-response server: error mapping, retries, signing ----------------------
@pytest.fixture
def canned() -> Iterator[Canned]:
    c = Canned()
    yield c
    c.server.shutdown()
    c.server.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def http(canned: Canned, sleeps: list[float]) -> Iterator[HttpStreamClient]:
    c = HttpStreamClient(
        "eu-west-1",
        canned.url,
        session(),
        max_attempts=4,
        backoff_initial=0.1,
        backoff_max=1.0,
        sleep=sleeps.append,
    )
    yield c
    c.close()


@pytest.mark.parametrize(
    ("status", "code", "error", "retried"),
    [
        (400, "ExpiredIteratorException", ExpiredIteratorError, False),
        (400, "TrimmedDataAccessException", TrimmedDataAccessError, False),
        (400, "ResourceNotFoundException", ResourceNotFoundError, False),
        (400, "ProvisionedThroughputExceededException", ThrottlingError, True),
        (400, "LimitExceededException", ThrottlingError, True),
        (400, "ThrottlingException", ThrottlingError, True),
        (500, "InternalServerError", ServiceError, True),
        (503, "ServiceUnavailable", ServiceError, True),
        (400, "AccessDeniedException", AccessDeniedError, False),
        (400, "UnrecognizedClientException", AccessDeniedError, False),
        (400, "ValidationException", ValidationError, False),
        (400, "SomethingNewException", StreamError, False),
    ],
)
def test_error_mapping_and_retry_policy(
    canned: Canned,
    http: HttpStreamClient,
    sleeps: list[float],
    status: int,
    code: str,
    error: type[StreamError],
    retried: bool,
) -> None:
    for _ in range(4):
        canned.error(status, code, "the service says no")
    with pytest.raises(error) as info:
        http.get_records("some-iterator")
    exc = info.value
    assert type(exc) is error
    assert (exc.code, exc.message, exc.status) == (code, "the service says no", status)
    assert exc.operation == "GetRecords" and exc.request_id == "RID"
    assert len(canned.requests) == (4 if retried else 1)
    assert len(sleeps) == (3 if retried else 0)
    assert all(0 <= s <= 1.0 for s in sleeps)


def test_a_retried_failure_then_success(canned: Canned, http: HttpStreamClient) -> None:
    canned.error(400, "ProvisionedThroughputExceededException")
    canned.responses.append((502, b"<html>Bad Gateway</html>", {}))
    canned.ok({"Records": [], "NextShardIterator": "next"})
    page = http.get_records("it")
    assert page.records == [] and page.next_iterator == "next"
    assert len(canned.requests) == 3


def test_requests_are_signed_json_posts(canned: Canned, http: HttpStreamClient) -> None:
    canned.ok({"ShardIterator": "it-1"})
    assert http.get_shard_iterator("arn:s", "shard-1", "AFTER_SEQUENCE_NUMBER", "1" * 25) == "it-1"
    canned.ok({"Table": {"TableName": "t", "KeySchema": [], "TableStatus": "ACTIVE"}})
    http.describe_table("t")
    (h1, b1), (h2, _) = canned.requests
    assert h1["X-Amz-Target"] == "DynamoDBStreams_20120810.GetShardIterator"
    assert h2["X-Amz-Target"] == "DynamoDB_20120810.DescribeTable"
    assert h1["Content-Type"] == "application/x-amz-json-1.0"
    auth = h1["Authorization"]
    assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    assert "/eu-west-1/dynamodb/aws4_request" in auth  # Streams is signed as "dynamodb"
    assert "host;" in auth and h1["X-Amz-Security-Token"] == TOKEN
    assert json.loads(b1) == {
        "StreamArn": "arn:s",
        "ShardId": "shard-1",
        "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
        "SequenceNumber": "1" * 25,
    }


def test_refreshable_credentials_are_read_per_request(canned: Canned) -> None:
    keys = iter(["AKIAFIRST", "AKIASECOND"])

    class Rotating:
        def get_frozen_credentials(self) -> Any:
            from botocore.credentials import ReadOnlyCredentials

            return ReadOnlyCredentials(next(keys), "secret", None)

    fake_session: Any = session()
    fake_session.get_credentials = lambda: Rotating()
    c = HttpStreamClient("us-east-1", canned.url, fake_session)
    canned.ok({"Table": {"TableName": "a", "TableStatus": "ACTIVE"}})
    canned.ok({"Table": {"TableName": "a", "TableStatus": "ACTIVE"}})
    c.describe_table("a")
    c.describe_table("a")
    creds = [h["Authorization"].split("Credential=")[1].split("/")[0] for h, _ in canned.requests]
    assert creds == ["AKIAFIRST", "AKIASECOND"]


def test_no_credentials_is_a_clear_error(canned: Canned) -> None:
    empty: Any = session()
    empty.get_credentials = lambda: None
    c = HttpStreamClient("us-east-1", canned.url, empty)
    with pytest.raises(AccessDeniedError, match="no AWS credentials found") as info:
        c.describe_table("t")
    assert info.value.code == "NoCredentials" and not canned.requests


def test_a_damaged_body_is_retried_and_reported(canned: Canned, http: HttpStreamClient) -> None:
    body = json.dumps({"Records": []}).encode()
    for _ in range(4):
        canned.responses.append((200, body, {"x-amz-crc32": str(zlib.crc32(body) ^ 1)}))
    with pytest.raises(ServiceError, match="x-amz-crc32") as info:
        http.get_records("it")
    assert info.value.code == "CRC32CheckFailed" and len(canned.requests) == 4
    canned.responses.append((200, body, {"x-amz-crc32": str(zlib.crc32(body))}))
    assert http.get_records("it").records == []


def test_a_non_json_success_is_a_service_error(canned: Canned, http: HttpStreamClient) -> None:
    for _ in range(8):
        canned.responses.append((200, b"<html>captive portal</html>", {}))
    with pytest.raises(ServiceError, match="response is not JSON"):
        http.describe_table("t")
    with pytest.raises(ServiceError, match="response is not JSON"):
        http.get_records("it")
    assert len(canned.requests) == 8  # retried, both


def test_get_records_over_http_decodes_records(canned: Canned, http: HttpStreamClient) -> None:
    record = {
        "eventName": "INSERT",
        "dynamodb": {
            "Keys": {"pk": {"S": "a"}},
            "NewImage": {"pk": {"S": "a"}, "n": {"N": "1.5"}},
            "SequenceNumber": "1" * 40,
            "ApproximateCreationDateTime": 1767225600.5,
        },
    }
    canned.ok({"Records": [record]})  # no NextShardIterator: SHARD_END
    page = http.get_records("it", limit=10)
    (rec,) = page.records
    assert rec.new_image == {"pk": "a", "n": Decimal("1.5")} and rec.sequence == "1" * 40
    assert page.next_iterator is None and page.shard_end
    assert json.loads(canned.requests[0][1]) == {"ShardIterator": "it", "Limit": 10}


def test_read_records_calls_now_and_decodes_later(canned: Canned, http: HttpStreamClient) -> None:
    """The worker's read-ahead: the request is made, its errors raised and the envelope read
    (record count, next iterator, body size) by read_records; the records are decoded only
    by decode(), to the same page as get_records. A body that is not JSON is retried and
    raised by read_records, as by get_records."""
    body = {"Records": [{"eventName": "REMOVE", "dynamodb": {
        "Keys": {"pk": {"S": "a"}}, "SequenceNumber": "12", "ApproximateCreationDateTime": 1.0,
    }}], "NextShardIterator": "next"}  # fmt: skip
    canned.ok(body)
    canned.ok(body)
    pending = http.read_records("it", limit=7)
    assert len(canned.requests) == 1 and json.loads(canned.requests[0][1])["Limit"] == 7
    assert (pending.count, pending.next_iterator) == (1, "next")
    assert pending.size == len(json.dumps(body).encode())
    page, direct = pending.decode(), http.get_records("it", limit=7)
    assert [(r.event, r.sequence, r.keys) for r in page.records] == [("REMOVE", "12", {"pk": "a"})]
    assert [(r.event, r.sequence, r.keys) for r in direct.records] == [
        ("REMOVE", "12", {"pk": "a"})
    ]
    assert page.next_iterator == direct.next_iterator == "next"
    assert page.size == direct.size == pending.size

    canned.responses.append((400, b'{"__type": "ExpiredIteratorException", "message": "old"}', {}))
    with pytest.raises(ExpiredIteratorError):
        http.read_records("it")

    sent = len(canned.requests)
    for _ in range(4):
        canned.responses.append((200, b"<html>captive portal</html>", {}))
    with pytest.raises(ServiceError, match="response is not JSON") as info:
        http.read_records("it")
    assert info.value.code == "MalformedResponse" and info.value.operation == "GetRecords"
    assert len(canned.requests) - sent == 4  # retried, as get_records is
    with pytest.raises(ValidationError, match="limit 0"):
        http.read_records("it", 0)


def test_connection_failures_are_retried_then_raised(sleeps: list[float]) -> None:
    c = HttpStreamClient(
        "us-east-1",
        "http://127.0.0.1:9",
        session(),
        max_attempts=3,
        connect_timeout=0.5,
        sleep=sleeps.append,
    )
    with pytest.raises(ConnectionFailedError) as info:
        c.describe_table("t")
    assert isinstance(info.value, ServiceError) and info.value.code == "ConnectionError"
    assert len(sleeps) == 2


def test_default_endpoints() -> None:
    c = HttpStreamClient("eu-central-1", session=session())
    assert c._streams.url == "https://streams.dynamodb.eu-central-1.amazonaws.com/"
    assert c._dynamodb.url == "https://dynamodb.eu-central-1.amazonaws.com/"
    cn = HttpStreamClient("cn-north-1", session=session())
    assert cn._dynamodb.url == "https://dynamodb.cn-north-1.amazonaws.com.cn/"
    with pytest.raises(ValueError, match="no AWS region"):
        HttpStreamClient(
            None, session=boto3.Session(aws_access_key_id="a", aws_secret_access_key="b")
        )


def test_http_client_is_a_stream_client() -> None:
    assert isinstance(HttpStreamClient("us-east-1", session=session()), StreamClient)


# --- pure parsing ------------------------------------------------------------------------
def test_parse_table_orders_key_schema_and_hides_a_disabled_stream() -> None:
    info = parse_table(
        {
            "Table": {
                "TableName": "t",
                "KeySchema": [
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                    {"AttributeName": "pk", "KeyType": "HASH"},
                ],
                "TableStatus": "UPDATING",
                "LatestStreamArn": "arn:old",
                "StreamSpecification": {"StreamEnabled": False},
                "ItemCount": 7,
            }
        }
    )
    assert info.key_names == ("pk", "sk") and info.stream_arn is None
    assert info.status == "UPDATING" and info.item_count == 7


def test_parse_stream_with_lineage_and_pagination() -> None:
    page = parse_stream(
        {
            "StreamDescription": {
                "StreamStatus": "ENABLED",
                "LastEvaluatedShardId": "s2",
                "Shards": [
                    {
                        "ShardId": "s1",
                        "SequenceNumberRange": {
                            "StartingSequenceNumber": "100",
                            "EndingSequenceNumber": "200",
                        },
                    },
                    {
                        "ShardId": "s2",
                        "ParentShardId": "s1",
                        "SequenceNumberRange": {"StartingSequenceNumber": "300"},
                    },
                ],
            }
        }
    )
    s1, s2 = page.shards
    assert (s1.closed, s1.ending_sequence, s2.parent_shard_id) == (True, "200", "s1")
    assert page.last_evaluated_shard_id == "s2"


def test_parse_records_shard_end() -> None:
    assert parse_records(b'{"Records": []}').next_iterator is None
    assert parse_records({"Records": [], "NextShardIterator": "n"}).shard_end is False


def test_list_shards_refuses_a_pagination_loop() -> None:
    class Looping(HttpStreamClient):
        def describe_stream(
            self, stream_arn: str, exclusive_start_shard_id: str | None = None
        ) -> Any:
            return parse_stream({"StreamDescription": {"Shards": [], "LastEvaluatedShardId": "x"}})

    with pytest.raises(ServiceError, match="twice"):
        Looping("us-east-1", session=session()).list_shards("arn")


def test_gc_pause_nests_across_threads_and_restores_the_previous_state() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    with gc_paused():
        assert not gc.isenabled()
        t.start()
        inside.wait(5)
    assert not gc.isenabled()  # the other thread is still parsing
    release.set()
    t.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed parse still re-enables the collector")
    assert gc.isenabled()


def test_errors_survive_pickling_with_their_fields() -> None:
    import pickle

    exc = ThrottlingError(
        "slow",
        code="LimitExceededException",
        operation="DescribeStream",
        status=400,
        request_id="r1",
    )
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is ThrottlingError and str(back) == str(exc)
    assert (back.code, back.operation, back.status, back.request_id) == (
        "LimitExceededException",
        "DescribeStream",
        400,
        "r1",
    )
    assert ExpiredIteratorError("x").code == "ExpiredIteratorException"
    assert str(ServiceError("boom", status=500)) == "InternalServerError: boom (HTTP 500)"
