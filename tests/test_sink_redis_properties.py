"""I1 + I2 for the Redis sinks: any delivery of any history converges to the projection of the
items' final states, on the real redis-server and the real Redis Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster

from viewkeeper import HashField, SetMember, SortedSetMember, Value, redis_view
from viewkeeper.projection.api import view_of
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.project import project
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.encoding import redis_value
from viewkeeper.sinks.redis import RedisSink, pack_version
from viewkeeper.sinks.redis_cluster import RedisClusterSink

ITEMS = ("o-1", "o-2", "o-3", "o-4")


@redis_view(table="orders", redis="cache")
def board(order: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"card:{order['id']}", {"customer": order["customer"], "status": order["status"]})
    yield SortedSetMember(f"customer:{order['customer']}:orders", order["id"], order["score"])
    if order["status"] != "void":
        yield SetMember(f"status:{order['status']}", order["id"])
    if order["score"] > 1:
        yield HashField(f"big:{order['customer']}", order["id"], order["status"])


_board = view_of(board)
assert _board is not None
BOARD = _board

states = st.none() | st.fixed_dictionaries(
    {
        "customer": st.sampled_from(["c1", "c2", "c3"]),
        "status": st.sampled_from(["new", "paid", "void"]),
        "score": st.sampled_from([1, 2.5, 3]),
    }
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[Change]]]:
    """A history (each record a new state of one item, in stream order, with sequence numbers
    of 21 to 40 digits) and a delivery of it: shuffled, with duplicates and replays, in
    batches. Returns the final state per item and the batches."""
    events = draw(st.lists(st.tuples(st.sampled_from(ITEMS), states), min_size=1, max_size=14))
    seqs = sorted(
        draw(
            st.lists(
                st.integers(10**20, 10**40 - 1),
                min_size=len(events),
                max_size=len(events),
                unique=True,
            )
        )
    )
    records, final = [], {}
    for (item, state), seq in zip(events, seqs, strict=True):
        full = None if state is None else {"id": item, **state}
        entries = [] if full is None else project(BOARD, full, item, ("id",))
        records.append(Change(BOARD, item, Version(0, str(seq)), entries))
        final[item] = full
    order = draw(st.permutations(range(len(records))))
    extra = draw(st.lists(st.integers(0, len(records) - 1), max_size=len(records)))
    delivery = list(order)
    for i in extra:  # duplicates and replays, anywhere
        delivery.insert(draw(st.integers(0, len(delivery))), i)
    batches, pos = [], 0
    while pos < len(delivery):
        size = draw(st.integers(1, 6))
        batches.append([records[i] for i in delivery[pos : pos + size]])
        pos += size
    return final, batches


def expected_keys(final: dict[str, Any]) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for item, state in final.items():
        if state is None:
            continue
        for e in project(BOARD, state, item, ("id",)):
            if isinstance(e, Value):
                out[e.key.encode()] = ("string", redis_value(e.value))
            elif isinstance(e, HashField):
                out.setdefault(e.key.encode(), ("hash", {}))[1][e.field.encode()] = redis_value(
                    e.value
                )
            elif isinstance(e, SetMember):
                out.setdefault(e.key.encode(), ("set", set()))[1].add(str(e.member).encode())
            elif isinstance(e, SortedSetMember):
                out.setdefault(e.key.encode(), ("zset", {}))[1][str(e.member).encode()] = float(
                    e.score
                )
    return out


def actual_keys(client: Any) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for key in client.scan_iter():
        if key.startswith(b"vk:"):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            out[key] = (kind, client.get(key))
        elif kind == "hash":
            out[key] = (kind, client.hgetall(key))
        elif kind == "set":
            out[key] = (kind, client.smembers(key))
        else:
            out[key] = (kind, dict(client.zrange(key, 0, -1, withscores=True)))
    return out


@pytest.fixture(params=["redis", "cluster"])
def server(request: pytest.FixtureRequest) -> Any:
    """The real redis-server, or the real Redis Cluster."""
    return request.getfixturevalue(
        "redis_client" if request.param == "redis" else "redis_cluster_client"
    )


def sink_for(client: Any) -> Any:
    if isinstance(client, RedisCluster):
        return RedisClusterSink("cache", client)
    return RedisSink("cache", client)


def live_claims(sink: Any, client: Any) -> int:
    if isinstance(sink, RedisClusterSink):
        return sum(c.live for c in sink.iter_claims())
    return sum(client.hlen(k) for k in client.scan_iter(b"vk:c:*"))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=deliveries())
def test_any_delivery_converges_to_the_projection_of_the_final_states(
    server: Any, case: tuple[dict[str, Any], list[list[Change]]]
) -> None:
    final, batches = case
    server.flushall()
    sink = sink_for(server)
    for batch in batches:
        results = sink.apply(batch)
        assert all(r.outcome is not Outcome.ERROR and not r.collisions for r in results)
    assert actual_keys(server) == expected_keys(final)
    # the bookkeeping agrees: each item owns exactly its projection, claims hold nothing else
    owned = 0
    for item, state in final.items():
        want = [] if state is None else [e.ident for e in project(BOARD, state, item, ("id",))]
        assert sorted(sink.owned_entries(BOARD, item) or []) == sorted(want)
        owned += len(want)
    assert live_claims(sink, server) == owned


@given(
    a=st.tuples(st.integers(0, 2**70), st.integers(0, 10**40 - 1)),
    b=st.tuples(st.integers(0, 2**70), st.integers(0, 10**40 - 1)),
)
def test_packed_versions_order_like_versions(a: tuple[int, int], b: tuple[int, int]) -> None:
    va, vb = Version(a[0], str(a[1])), Version(b[0], str(b[1]))
    pa, pb = pack_version(va), pack_version(vb)
    assert (pa < pb) == (va < vb) and (pa == pb) == (va == vb)


@pytest.mark.parametrize("digits", [21, 39, 40])
def test_packed_versions_cross_lengths(digits: int) -> None:
    low, high = Version(0, "9" * (digits - 1)), Version(0, "1" + "0" * (digits - 1))
    assert pack_version(low) < pack_version(high)
