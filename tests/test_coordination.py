"""The coordination store contract, for the in-memory store and for DynamoDB on moto."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Canned
from tests.testbed import free_port
from viewkeeper.coordination.dynamodb import CoordinationTableError, DynamoDBStore
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.coordination.model import (
    CoordinationUnavailable,
    DeadLetter,
    Lease,
    LeaseLost,
    LeaseState,
    WorkerInfo,
)


@pytest.fixture(params=["memory", "dynamodb"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    client = request.getfixturevalue("dynamodb")
    s = DynamoDBStore(client, f"vk-coord-{uuid.uuid4().hex[:8]}")
    s.ensure()
    yield s
    client.delete_table(TableName=s.table)


def test_lease_is_created_once(store: Any) -> None:
    lease = Lease("orders", "shard-1", "arn:stream", parents=("shard-0",))
    assert store.create_lease(lease) is True
    assert store.create_lease(lease) is False
    (got,) = store.list_leases("orders")
    assert got.parents == ("shard-0",) and got.owner is None and got.counter == 0


def test_only_one_of_two_workers_takes_a_lease(store: Any) -> None:
    store.create_lease(Lease("orders", "s1", "arn"))
    (seen,) = store.list_leases("orders")
    a = store.take_lease(seen, "worker-a")
    b = store.take_lease(seen, "worker-b")  # same observed counter: must lose
    assert a is not None and a.owner == "worker-a" and a.counter == 1
    assert b is None


def test_renewal_raises_the_counter_and_fails_after_a_steal(store: Any) -> None:
    store.create_lease(Lease("orders", "s1", "arn"))
    mine = store.take_lease(store.list_leases("orders")[0], "a")
    renewed = store.renew_lease(mine, 1.5, False)
    assert renewed.counter == mine.counter + 1 and renewed.lag == 1.5
    stolen = store.take_lease(store.list_leases("orders")[0], "b")
    assert stolen is not None
    assert store.renew_lease(renewed, 0.0, True) is None


def test_checkpoint_requires_ownership(store: Any) -> None:
    store.create_lease(Lease("orders", "s1", "arn"))
    mine = store.take_lease(store.list_leases("orders")[0], "a")
    store.checkpoint(mine, "100000000000000000001")
    assert store.list_leases("orders")[0].checkpoint == "100000000000000000001"
    store.take_lease(store.list_leases("orders")[0], "b")
    with pytest.raises(LeaseLost):
        store.checkpoint(mine, "100000000000000000002")
    assert store.list_leases("orders")[0].checkpoint == "100000000000000000001"


def test_a_checkpoint_never_moves_backwards_after_the_owner_took_the_lease_again(
    store: Any,
) -> None:
    """Issue #13 case 8: a worker thread of a process that lost its lease and took it back
    (a new worker of the same process read on to 900) must not write its old checkpoint
    500. Checkpoints are fenced by the take (the lease's token), not by the owner's name."""
    store.create_lease(Lease("orders", "s1", "arn"))
    first = store.take_lease(store.list_leases("orders")[0], "a")  # the old worker's lease
    store.checkpoint(first, "100000000000000000100")
    other = store.take_lease(store.list_leases("orders")[0], "b")  # a (stalled) lost it
    store.release_lease(other)
    again = store.take_lease(store.list_leases("orders")[0], "a")  # a takes it back
    store.checkpoint(again, "100000000000000000900")
    with pytest.raises(LeaseLost):
        store.checkpoint(first, "100000000000000000500")
    assert store.list_leases("orders")[0].checkpoint == "100000000000000000900"
    with pytest.raises(LeaseLost):  # nor may it end the shard or mark it
        store.checkpoint(first, None, state=LeaseState.NEEDS_REBUILD, error="x")
    assert store.list_leases("orders")[0].state is LeaseState.ACTIVE


def test_a_checkpoint_is_never_written_below_the_stored_one(store: Any) -> None:
    """Belt and braces for case 8: even the current holder cannot move the checkpoint
    back (sequence numbers compared as integers: 21 vs 22 digits)."""
    store.create_lease(Lease("orders", "s1", "arn"))
    mine = store.take_lease(store.list_leases("orders")[0], "a")
    store.checkpoint(mine, "1000000000000000000005")  # 22 digits
    with pytest.raises(LeaseLost, match="backwards"):
        store.checkpoint(mine, "999999999999999999999")  # 21 digits: smaller
    store.checkpoint(mine, "1000000000000000000005")  # the same again: fine (a replay)
    store.checkpoint(mine, "1000000000000000000006")
    assert store.list_leases("orders")[0].checkpoint == "1000000000000000000006"


def test_state_and_error_are_recorded_and_reset(store: Any) -> None:
    store.create_lease(Lease("orders", "s1", "arn"))
    mine = store.take_lease(store.list_leases("orders")[0], "a")
    store.checkpoint(mine, None, state=LeaseState.NEEDS_REBUILD, error="trimmed")
    got = store.list_leases("orders")[0]
    assert got.state is LeaseState.NEEDS_REBUILD and got.error == "trimmed"
    store.reset_lease("orders", "s1", None, LeaseState.ACTIVE)
    got = store.list_leases("orders")[0]
    assert got.state is LeaseState.ACTIVE and got.error is None and got.checkpoint is None


def test_release_frees_the_lease(store: Any) -> None:
    store.create_lease(Lease("orders", "s1", "arn"))
    mine = store.take_lease(store.list_leases("orders")[0], "a")
    store.release_lease(mine)
    assert store.list_leases("orders")[0].owner is None


def test_generations_rise_and_workers_acknowledge(store: Any) -> None:
    assert store.generations() == {}
    assert store.raise_generation("order_card") == 1
    assert store.raise_generation("order_card") == 2
    store.put_worker(WorkerInfo("w1", 123.0, {"order_card": 2}, "host", 42, 3, 100.0))
    (w,) = store.list_workers()
    assert w.acked == {"order_card": 2} and w.leases == 3
    store.delete_worker("w1")
    assert store.list_workers() == []


def test_dead_letters_keep_the_raw_record(store: Any) -> None:
    raw = {
        "eventName": "INSERT",
        "dynamodb": {"Keys": {"pk": {"S": "a\nb"}}, "SequenceNumber": "1" * 40},
    }
    store.put_deadletter(
        DeadLetter("0001-x", "v", "orders", "a\nb", "1" * 40, "boom", "Traceback...", 5.0, raw)
    )
    (dl,) = store.list_deadletters()
    assert dl.record == raw and dl.error == "boom" and dl.item_key == "a\nb"
    store.delete_deadletter(dl.id)
    assert store.list_deadletters() == []


def test_wrong_schema_is_refused_with_a_clear_error(dynamodb: Any) -> None:
    name = f"vk-wrong-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
    )
    with pytest.raises(CoordinationTableError, match=r"expected pk \(S, HASH\)"):
        DynamoDBStore(dynamodb, name).ensure()


def test_missing_table_is_not_created_when_forbidden(dynamodb: Any) -> None:
    with pytest.raises(CoordinationTableError, match="create_if_missing"):
        DynamoDBStore(dynamodb, "vk-absent-x", create_if_missing=False).ensure()


def _client(url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "dynamodb",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=1),
    )


OWNED = Lease("orders", "s1", "arn", owner="worker-a", counter=1)


def test_a_checkpoint_the_table_cannot_take_now_is_coordination_unavailable() -> None:
    """The shard worker retries a checkpoint on CoordinationUnavailable (the page stays
    applied) instead of crashing: no connection, throttling and 5xx answers raise it; a
    conditional failure is still LeaseLost and a client error goes up as it is."""
    store = DynamoDBStore(_client(f"http://127.0.0.1:{free_port()}"), "vk-coord")
    with pytest.raises(CoordinationUnavailable, match=r"coordination table vk-coord: .*connect"):
        store.checkpoint(OWNED, "100000000000000000001")

    canned = Canned()
    try:
        store = DynamoDBStore(_client(canned.url), "vk-coord")
        for status, code in (
            (400, "ProvisionedThroughputExceededException"),
            (400, "ThrottlingException"),
            (500, "InternalServerError"),
            (503, "ServiceUnavailable"),
        ):
            canned.error(status, code)
            with pytest.raises(CoordinationUnavailable, match=code):
                store.checkpoint(OWNED, "100000000000000000001")
        canned.error(400, "ConditionalCheckFailedException")
        with pytest.raises(LeaseLost):
            store.checkpoint(OWNED, "100000000000000000001")
        canned.error(400, "ValidationException", "bad expression")
        with pytest.raises(Exception, match="bad expression") as info:
            store.checkpoint(OWNED, "100000000000000000001")
        assert not isinstance(info.value, CoordinationUnavailable | LeaseLost)
    finally:
        canned.server.shutdown()
        canned.server.server_close()
