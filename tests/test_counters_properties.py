"""Aggregate views against an oracle, on the real redis-server and the real Redis Cluster:
items move between groups, change amounts, are deleted and re-created; their records are
delivered shuffled, duplicated
and replayed, in batches, and a rebuild (a newer generation re-reading some items while the
stream writes some of them too, then the sweep) may run after a counter was deleted or changed
outside viewkeeper. Every counter equals the oracle's sum over the items' final states,
a counter no item contributes to is absent, and the claims count the contributors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster

from tests.helpers import view_for
from viewkeeper import Counter, SortedSetCounter, Value, redis_view
from viewkeeper.projection.entries import Entry
from viewkeeper.projection.project import project
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.redis import RedisSink
from viewkeeper.sinks.redis_cluster import RedisClusterSink

ITEMS = ("i-1", "i-2", "i-3", "i-4", "i-5")
BIG = 2**59  # six items cannot overflow a Counter; a sorted-set amount stays below 2**50


@redis_view(table="things", redis="cache")
def tally(item: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"thing:{item['id']}", item["g"])
    yield Counter(f"count:{item['g']}")
    yield Counter(f"sum:{item['g']}", amount=item["a"])
    yield Counter("by_group", field=item["g"], amount=item["a"])
    yield SortedSetCounter("board", member=item["m"], amount=item["b"])
    if item["extra"]:  # the same counter twice from one item: its amounts add up
        yield Counter(f"sum:{item['g']}", amount=item["extra"])


TALLY = view_for(tally)
Rebuild = tuple[list[Change], str]  # the rebuild's changes, and what was done to a counter

states = st.none() | st.fixed_dictionaries(
    {
        "g": st.sampled_from(["g1", "g2", "g3"]),
        "m": st.sampled_from(["m1", "m2"]),
        "a": st.sampled_from([0, 1, 5, -5, 7, BIG, -BIG]) | st.integers(-BIG, BIG),
        "b": st.sampled_from([0, 1, -1, 3]) | st.integers(-(2**50), 2**50),
        "extra": st.sampled_from([0, 0, 2, -(2**58)]),
    }
)


def change(item: str, gen: int, seq: int, state: dict[str, Any] | None) -> Change:
    full = None if state is None else {"id": item, **state}
    entries = [] if full is None else project(TALLY, full, item, ("id",))
    return Change(TALLY, item, Version(gen, str(seq)), entries)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[Change]], Rebuild | None]:
    """A history of states per item (stream order), delivered shuffled with duplicates and
    replays in batches; optionally a rebuild (generation 1) after it: it re-reads some items
    at their final state (the others were deleted from the table meanwhile, say) and sweeps
    the others, after a counter was deleted or changed outside viewkeeper. Returns the final
    states, the batches, and the rebuild's changes and tampering (None: no rebuild)."""
    events = draw(st.lists(st.tuples(st.sampled_from(ITEMS), states), min_size=1, max_size=16))
    seqs = sorted(
        draw(
            st.lists(
                st.integers(10**20, 10**22),
                min_size=len(events),
                max_size=len(events),
                unique=True,
            )
        )
    )
    records, final = [], {}
    for (item, state), seq in zip(events, seqs, strict=True):
        records.append(change(item, 0, seq, state))
        final[item] = state
    order = draw(st.permutations(range(len(records))))
    delivery = list(order)
    for i in draw(st.lists(st.integers(0, len(records) - 1), max_size=len(records))):
        delivery.insert(draw(st.integers(0, len(delivery))), i)
    batches, pos = [], 0
    while pos < len(delivery):
        size = draw(st.integers(1, 6))
        batches.append([records[i] for i in delivery[pos : pos + size]])
        pos += size
    reread = None
    if draw(st.booleans()):
        # the rebuild runs after every record was delivered once at least (the stream keeps
        # flowing meanwhile: the replays below come after it); it reads the table's items,
        # some of which the stream also writes at the new generation (their last record),
        # before or after the scan reads them
        reread = [i for i in ITEMS if final.get(i) is not None and draw(st.booleans())]
        last = {r.item_key: r for r in records}
        rebuild: list[Change] = []
        for i in reread:
            scan = change(i, 1, 0, final[i])
            live = Change(TALLY, i, Version(1, last[i].version.sequence), last[i].entries)
            rebuild += draw(st.sampled_from([[scan], [scan, live], [live, scan]]))
        tamper = draw(st.sampled_from(["no", "delete", "change"]))
        return final, batches, (rebuild, tamper)
    return final, batches, None


def expected(final: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item, s in final.items():
        if s is None:
            continue
        out[f"thing:{item}"] = s["g"]
        out[f"count:{s['g']}"] = out.get(f"count:{s['g']}", 0) + 1
        out[f"sum:{s['g']}"] = out.get(f"sum:{s['g']}", 0) + s["a"] + s["extra"]
        by = out.setdefault("by_group", {})
        by[s["g"]] = by.get(s["g"], 0) + s["a"]
        board = out.setdefault("board", {})
        board[s["m"]] = board.get(s["m"], 0) + s["b"]
    return out


def actual(client: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw in client.scan_iter():
        key = raw.decode()
        if key.startswith("vk:"):
            continue
        if key.startswith("thing:"):
            out[key] = client.get(raw).decode()
        elif key == "by_group":
            out[key] = {f.decode(): int(v) for f, v in client.hgetall(raw).items()}
        elif key == "board":
            out[key] = {m.decode(): int(s) for m, s in client.zrange(raw, 0, -1, withscores=True)}
        else:
            out[key] = int(client.get(raw))
    return out


@pytest.fixture(params=["redis", "cluster"])
def server(request: pytest.FixtureRequest) -> Any:
    """The real redis-server, or the real Redis Cluster (the cluster sink)."""
    return request.getfixturevalue(
        "redis_client" if request.param == "redis" else "redis_cluster_client"
    )


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=deliveries())
def test_every_counter_equals_the_sum_over_the_final_states(
    server: Any, case: tuple[dict[str, Any], list[list[Change]], Rebuild | None]
) -> None:
    final, batches, reread = case
    redis_client = server
    redis_client.flushall()
    cluster = isinstance(redis_client, RedisCluster)
    sink: Any = (
        RedisClusterSink("cache", redis_client) if cluster else RedisSink("cache", redis_client)
    )
    for batch in batches:
        results = sink.apply(batch)
        assert all(r.outcome is not Outcome.ERROR and not r.collisions for r in results)
    if reread is not None:
        # something outside viewkeeper deletes or changes a counter; a rebuild at generation
        # 1 re-reads items, then the sweep retracts the rest and sets every counter to the
        # rebuild's sums; the stream's records (generation 0) delivered again are all stale
        rebuild, tamper = reread
        counter = next((k for k in sorted(redis_client.keys(b"sum:*"))), None)
        if counter is not None and tamper == "delete":
            redis_client.delete(counter)
        elif counter is not None and tamper == "change":
            redis_client.set(counter, "-12345")
        sink.begin_rebuild(TALLY, 0)
        assert all(r.outcome is not Outcome.ERROR for r in sink.apply(rebuild))
        sink.sweep(TALLY, 1, 0)
        final = {c.item_key: final[c.item_key] for c in rebuild}
        for batch in batches[-2:]:
            assert all(r.outcome is Outcome.STALE for r in sink.apply(batch))
    assert actual(redis_client) == expected(final)
    # each counter's claim counts its contributors; nothing else is claimed but the Values
    claims: dict[bytes, bytes] = {}
    if cluster:  # entries' and counters' claims (not contributions, not retraction marks)
        claims = {
            c.identity: c.raw for c in sink.iter_claims(TALLY) if c.kind in ("claim", "counter")
        }
    for key in [] if cluster else redis_client.scan_iter(b"vk:c:*"):
        claims.update(redis_client.hgetall(key))
    live = [s for s in final.values() if s is not None]
    counted = {
        b"Vcount:" + g.encode(): sum(s["g"] == g for s in live) for g in {s["g"] for s in live}
    }
    for ident, want in counted.items():
        # standalone: '<vid>#<n>'; cluster: '#<vid>#<n>#<sum>'
        assert claims[ident].split(b"#")[2 if cluster else 1] == b"%d" % want
    contributions = len({s["g"] for s in live}) * 3 + len({s["m"] for s in live})
    assert len(claims) == len(live) + contributions
