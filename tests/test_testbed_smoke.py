"""The test bed's services are the real things: Redis + Lua, OpenSearch + painless/analysis/
reindex modules, moto's DynamoDB with a NEW_AND_OLD_IMAGES stream over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from opensearchpy import OpenSearch

CAS_LUA = """
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'body', ARGV[2])
return 1
"""

# Stale writes become no-ops: the document keeps the newest version seen.
CMP_PAINLESS = """
if (ctx._source.v != null && ctx._source.v >= params.version) {
  ctx.op = 'noop';
} else {
  ctx._source.v = params.version;
  ctx._source.body = params.body;
}
"""


@pytest.mark.redis
def test_redis_is_real_and_runs_lua(redis_client: redis.Redis) -> None:
    info: dict[str, Any] = redis_client.info("server")
    assert str(info["redis_version"]).split(".")[0] >= "7"
    assert redis_client.config_get("save") == {"save": ""}
    sha = redis_client.script_load(CAS_LUA)
    assert redis_client.evalsha(sha, 1, "k", 5, "five") == 1
    assert redis_client.evalsha(sha, 1, "k", 3, "three") == 0  # stale
    assert redis_client.evalsha(sha, 1, "k", 7, "seven") == 1
    assert redis_client.hgetall("k") == {b"v": b"7", b"body": b"seven"}


def _bulk_upsert(client: OpenSearch, index: str, script_id: str, version: int, body: str) -> str:
    lines = [
        {"update": {"_index": index, "_id": "doc-1"}},
        {
            "scripted_upsert": True,
            "script": {"id": script_id, "params": {"version": version, "body": body}},
            "upsert": {},
        },
    ]
    response = client.bulk(body=lines, refresh="true")
    assert response["errors"] is False, response
    return str(response["items"][0]["update"]["result"])


@pytest.mark.opensearch
def test_opensearch_stored_script_scripted_upsert_noop(
    os_client: OpenSearch, os_prefix: str
) -> None:
    assert str(os_client.info()["version"]["number"]).startswith("2.19.")
    index, script_id = f"{os_prefix}docs", f"{os_prefix}cmp"
    os_client.put_script(
        id=script_id, body={"script": {"lang": "painless", "source": CMP_PAINLESS}}
    )
    os_client.indices.create(index=index, body={"settings": {"number_of_replicas": 0}})

    assert _bulk_upsert(os_client, index, script_id, 5, "new") == "created"
    assert _bulk_upsert(os_client, index, script_id, 3, "old") == "noop"
    assert os_client.get(index=index, id="doc-1")["_source"] == {"v": 5, "body": "new"}
    assert _bulk_upsert(os_client, index, script_id, 6, "newer") == "updated"
    assert os_client.get(index=index, id="doc-1")["_source"] == {"v": 6, "body": "newer"}


@pytest.mark.opensearch
def test_opensearch_delete_by_query(os_client: OpenSearch, os_prefix: str) -> None:
    index = f"{os_prefix}dbq"
    os_client.indices.create(index=index, body={"settings": {"number_of_replicas": 0}})
    for i in range(6):
        os_client.index(index=index, id=str(i), body={"tenant": "a" if i % 2 else "b", "n": i})
    os_client.indices.refresh(index=index)
    result = os_client.delete_by_query(
        index=index, body={"query": {"term": {"tenant.keyword": "a"}}}, refresh=True
    )
    assert result["deleted"] == 3
    assert result["failures"] == []
    assert os_client.count(index=index)["count"] == 3


@pytest.mark.opensearch
def test_opensearch_analysis_common(os_client: OpenSearch, os_prefix: str) -> None:
    index = f"{os_prefix}names"
    os_client.indices.create(
        index=index,
        body={
            "settings": {
                "number_of_replicas": 0,
                "analysis": {
                    "filter": {"edge": {"type": "edge_ngram", "min_gram": 2, "max_gram": 10}},
                    "analyzer": {
                        "folded": {
                            "tokenizer": "standard",
                            "filter": ["lowercase", "asciifolding"],
                        },
                        "prefix": {
                            "tokenizer": "standard",
                            "filter": ["lowercase", "asciifolding", "edge"],
                        },
                    },
                },
            },
            "mappings": {
                "properties": {
                    "name": {"type": "text", "analyzer": "prefix", "search_analyzer": "folded"}
                }
            },
        },
    )
    tokens = os_client.indices.analyze(
        index=index, body={"analyzer": "folded", "text": "Crème Brûlée"}
    )["tokens"]
    assert [t["token"] for t in tokens] == ["creme", "brulee"]
    os_client.index(index=index, id="1", body={"name": "Crème Brûlée"}, refresh="true")
    hits = os_client.search(index=index, body={"query": {"match": {"name": "bru"}}})
    assert hits["hits"]["total"]["value"] == 1


@pytest.mark.dynamodb
def test_moto_stream_returns_insert(
    dynamodb: Any,
    dynamodbstreams: Any,
    table_name: str,
    make_table: Callable[..., tuple[str, str]],
) -> None:
    name, stream_arn = make_table(dynamodb, table_name, hash_key="pk", range_key="sk")
    assert stream_arn
    dynamodb.put_item(
        TableName=name,
        Item={"pk": {"S": "order#1"}, "sk": {"S": "v"}, "total": {"N": "42"}},
    )

    stream = dynamodbstreams.describe_stream(StreamArn=stream_arn)["StreamDescription"]
    assert stream["StreamViewType"] == "NEW_AND_OLD_IMAGES"
    shards = stream["Shards"]
    assert len(shards) >= 1
    iterator = dynamodbstreams.get_shard_iterator(
        StreamArn=stream_arn,
        ShardId=shards[0]["ShardId"],
        ShardIteratorType="TRIM_HORIZON",
    )["ShardIterator"]
    records = dynamodbstreams.get_records(ShardIterator=iterator)["Records"]
    assert [r["eventName"] for r in records] == ["INSERT"]
    change = records[0]["dynamodb"]
    assert change["SequenceNumber"]
    assert change["Keys"] == {"pk": {"S": "order#1"}, "sk": {"S": "v"}}
    assert change["NewImage"] == {"pk": {"S": "order#1"}, "sk": {"S": "v"}, "total": {"N": "42"}}
    assert "OldImage" not in change
