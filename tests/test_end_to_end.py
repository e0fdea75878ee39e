"""End to end through moto's DynamoDB Streams, the real Redis and the real OpenSearch,
driving the real `viewkeeper` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import redis_view_keys, vk, vk_env, write_config

TABLE = "e2e-orders"


@pytest.fixture
def setup(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    os_client: Any,
    os_prefix: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
) -> Any:
    make_table(dynamodb, TABLE, hash_key="order_id")
    return write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.shop"],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
        opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
    )


def put(
    dynamodb: Any, order_id: str, customer: str, status: str, total: str, created: int = 1
) -> None:
    dynamodb.put_item(
        TableName=TABLE,
        Item={
            "order_id": {"S": order_id},
            "customer_id": {"S": customer},
            "status": {"S": status},
            "total": {"N": total},
            "created_at": {"N": str(created)},
        },
    )


def search_docs(os_client: Any, alias: str) -> dict[str, Any]:
    os_client.indices.refresh(index=alias)
    hits = os_client.search(index=alias, body={"size": 100, "query": {"match_all": {}}})
    return {
        h["_id"]: {k: v for k, v in h["_source"].items() if k in ("customer_id", "status", "total")}
        for h in hits["hits"]["hits"]
    }


def test_items_written_with_boto3_appear_in_redis_and_opensearch_and_deletes_disappear(
    setup: Path, dynamodb: Any, redis_client: Any, os_client: Any, os_prefix: str
) -> None:
    put(dynamodb, "o1", "alice", "new", "10.50", 1)
    put(dynamodb, "o2", "bob", "new", "3", 2)
    put(dynamodb, "o3", "alice", "new", "7", 3)
    res = vk("run", "-c", str(setup), "--until-caught-up")
    assert res.returncode == 0, res.stderr

    assert redis_view_keys(redis_client) == {
        "order:o1": '{"status":"new","total":10.50}',
        "order:o2": '{"status":"new","total":3}',
        "order:o3": '{"status":"new","total":7}',
        "customer:alice:orders": {"o1": 1.0, "o3": 3.0},
        "customer:bob:orders": {"o2": 2.0},
        "customer:alice:totals": {"o1": "10.50", "o3": "7"},
        "customer:bob:totals": {"o2": "3"},
        "status:new": {"o1", "o2", "o3"},
    }
    alias = f"{os_prefix}orders"
    assert search_docs(os_client, alias) == {
        "o1": {"customer_id": "alice", "status": "new", "total": 10.5},
        "o2": {"customer_id": "bob", "status": "new", "total": 3.0},
        "o3": {"customer_id": "alice", "status": "new", "total": 7.0},
    }

    put(dynamodb, "o1", "carol", "paid", "10.50", 1)  # moves customer and status
    dynamodb.delete_item(TableName=TABLE, Key={"order_id": {"S": "o2"}})
    put(dynamodb, "o3", "alice", "hidden", "7", 3)  # the search view retracts, redis keeps
    res = vk("run", "-c", str(setup), "--until-caught-up")
    assert res.returncode == 0, res.stderr

    assert redis_view_keys(redis_client) == {  # the daemon's log, if this fails:
        "order:o1": '{"status":"paid","total":10.50}',
        "order:o3": '{"status":"hidden","total":7}',
        "customer:carol:orders": {"o1": 1.0},
        "customer:alice:orders": {"o3": 3.0},
        "customer:carol:totals": {"o1": "10.50"},
        "customer:alice:totals": {"o3": "7"},
        "status:paid": {"o1"},
        "status:hidden": {"o3"},
    }, res.stderr
    assert search_docs(os_client, alias) == {
        "o1": {"customer_id": "carol", "status": "paid", "total": 10.5}
    }
    assert os_client.exists(index=alias, id="o2") is False  # GET by id hides tombstones


def test_status_shows_each_shard_with_owner_checkpoint_and_lag(setup: Path, dynamodb: Any) -> None:
    put(dynamodb, "o1", "alice", "new", "1")
    assert vk("run", "-c", str(setup), "--until-caught-up").returncode == 0
    res = vk("status", "-c", str(setup), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (shard,) = data["shards"]
    assert shard["table"] == TABLE and shard["state"] == "active"
    assert shard["checkpoint"] and shard["checkpoint"].isdigit()
    assert shard["owner"] is None  # released on a clean exit
    table = vk("status", "-c", str(setup)).stdout
    assert "SHARD" in table and shard["shard_id"][-20:] in table and "worst lag" in table


def test_projection_error_is_dead_lettered_the_rest_applied_and_replayable(
    setup: Path, dynamodb: Any, redis_client: Any
) -> None:
    put(dynamodb, "o1", "alice", "new", "1")
    put(dynamodb, "o2", "bob", "boom", "2")
    put(dynamodb, "o3", "carol", "new", "3")
    env = vk_env() | {"VK_TEST_BOOM": "1"}
    res = vk("run", "-c", str(setup), "--until-caught-up", env=env)
    assert res.returncode == 0, res.stderr
    keys = redis_view_keys(redis_client)
    assert "order:o1" in keys and "order:o3" in keys and "order:o2" not in keys
    assert keys["status:boom"] == {"o2"}  # the other view on the same record was applied

    listed = vk("deadletters", "list", "-c", str(setup), "--json")
    (dl,) = json.loads(listed.stdout)
    assert dl["view"] == "order_card" and dl["item_key"] == "o2"
    assert "this order cannot be shown" in dl["error"] and "RuntimeError" in dl["traceback"]

    res = vk("deadletters", "replay", "-c", str(setup))  # the view is fixed (no env var)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "applied 1" in res.stdout
    assert redis_view_keys(redis_client)["order:o2"] == '{"status":"boom","total":2}'
    assert json.loads(vk("deadletters", "list", "-c", str(setup), "--json").stdout) == []


def test_check_reaches_every_service(setup: Path) -> None:
    res = vk("check", "-c", str(setup))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all checks passed" in res.stdout
    assert "redis cache: ok" in res.stdout and "opensearch search: ok" in res.stdout


def test_bad_config_key_is_one_clear_line_and_exit_78(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("aws: {region: us-east-1}\nviews: [views.orders]\nworkr: {}\n")
    res = vk("check", "-c", str(path))
    assert res.returncode == 78  # EX_CONFIG: systemd does not restart into a bad config
    (line,) = res.stderr.strip().splitlines()
    assert "workr" in line and "worker" in line
