"""Adversarial tests of the sinks and the namespace logic (attack review).

Each test here reproduced a scenario in which one of the documented guarantees (I1-I6,
"one namespace, one source", "a sink that lost its data is detected and reported") did not
hold on the code it was written against; each failed there, and passes since its fix (the
commits name the test). The namespace scenarios the same review found (a second loss during
the automatic rebuild, a take-over undone by a late write, two daemons starting together)
are in tests/test_namespaces.py.

Two property tests at the end (two shard workers passing document ids between items with
their requests interleaved, kills, lease handovers and replays) are attacks that HELD:
they pass, and stay here as regression checks of the concurrent claim logic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opensearchpy import OpenSearch

from tests.helpers import registry_of, view_for
from tests.test_sink_opensearch import CARDS, ORDERS, outcomes, rm, up
from tests.test_sink_opensearch_properties import NAMES, _newest_per_item, shared_timeline
from tests.testbed import RedisServer
from viewkeeper import Value, redis_view
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Document, Entry
from viewkeeper.projection.versions import Version
from viewkeeper.runtime.namespaces import Namespaces
from viewkeeper.sinks.base import Change, NamespaceLost, Outcome, Owner, SinkError
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.sinks.redis import RedisSink

needs_os = pytest.mark.opensearch

OWNER_A = Owner("arn:aws:dynamodb:us-east-1:1:table/orders", "vk-coord", "deployment-a")
OWNER_B = Owner("arn:aws:dynamodb:us-east-1:1:table/orders-v2", "vk-coord-2", "deployment-b")


def os_namespaces(
    sink: OpenSearchSink, store: MemoryStore, *views: View, owner: Owner = OWNER_A
) -> Namespaces:
    return Namespaces(
        registry_of(*views),
        {("opensearch", "search"): sink},
        store,
        {v.table: owner for v in views},
    )


# =========================================================================================
# OpenSearch: the if_seq_no fast path after the index was deleted and made again
# =========================================================================================
@needs_os
def test_cas_cache_outlives_a_recreated_index_and_a_stale_put_overwrites_a_newer_document(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch
) -> None:
    """I2 / I1. Daemon A writes o-1 at 10 (create fast path: seq_no 0, primary term 1,
    cached). The index is deleted (a lost namespace) and made again by daemon B's re-arm;
    B writes o-1 at 30 -- in the new index that is again seq_no 0, primary term 1. A then
    applies an older record of o-1 (at 20: a replay after a lease handover, or a rebuild's
    scan) -- newer than what A cached, older than what the index holds. The sink's README.md says
    the cached ``index`` with ``if_seq_no`` "succeeds only if nobody wrote the document
    since"; but (seq_no, primary_term) restart at (0, 1) in a new index, so it succeeds and
    the stale body replaces the newer one for good."""
    a = make_sink()
    a.prepare([ORDERS])
    assert outcomes(a.apply([up(ORDERS, "o-1", 10, {"n": 10})])) == ["applied"]
    names = a.indexes(ORDERS)
    os_client.indices.delete(index=f"{names.live},{names.owners}")
    b = make_sink()  # another daemon: it noticed the loss and made the indexes again
    b.prepare([ORDERS])
    assert outcomes(b.apply([up(ORDERS, "o-1", 30, {"n": 30})])) == ["applied"]

    results = a.apply([up(ORDERS, "o-1", 20, {"n": 20})])  # older than what the index holds

    docs = a.live_documents(ORDERS)
    assert docs == {"o-1": {"n": 30}}, (
        f"a stale put (20) replaced the newer document (30): {docs}, "
        f"outcome {outcomes(results)}, stats {a.stats}"
    )


# =========================================================================================
# OpenSearch: both indexes of a view deleted (DELETE cards*): the re-arm cannot happen
# =========================================================================================
@needs_os
def test_a_view_whose_indexes_were_both_deleted_is_re_armed_and_written_again(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch
) -> None:
    """ "A sink that lost its data is detected and reported"; the stream goes on and a
    rebuild restores it. Both indexes of a custom-id view are deleted (``DELETE cards*``,
    a cluster that lost them). The next batch writes its owner records first (W1,
    ``require_alias`` off): OpenSearch auto-creates ``cards.vk-owners`` with DYNAMIC
    mappings (``v``, ``item``, ``doc`` as text). Only then does the live phase see the
    missing alias and raise NamespaceLost. The re-arm (``Namespaces.lost`` ->
    ``write_claim`` -> ``_prepare_view``) then puts the owner mappings on that index, which
    OpenSearch refuses (text -> keyword): every retry, every ``viewkeeper rebuild`` fails
    the same way until someone deletes the owners index by hand."""
    store = MemoryStore()
    sink = make_sink()
    sink.prepare([CARDS])
    ns = os_namespaces(sink, store, CARDS)
    ns.claim()
    assert outcomes(sink.apply([up(CARDS, "i", 10, {"card": "d"})])) == ["applied"]
    names = sink.indexes(CARDS)
    os_client.indices.delete(index=f"{names.live},{names.owners}")

    with pytest.raises(NamespaceLost) as lost:
        sink.apply([up(CARDS, "i", 11, {"card": "e"})])
    try:
        ns.lost(sink, lost.value)  # re-arm: report the loss, claim again
    except SinkError as exc:
        pytest.fail(f"the lost namespace cannot be re-armed: {exc}")
    assert store.view_states()[CARDS.name].needs_rebuild
    assert outcomes(sink.apply([up(CARDS, "i", 11, {"card": "e"})])) == ["applied"]


# =========================================================================================
# OpenSearch: the owner index lost alone (tombstones gone) is never noticed
# =========================================================================================
@needs_os
def test_a_lost_owner_index_is_noticed_or_a_stale_put_stays_dead(
    make_sink: Callable[..., OpenSearchSink], os_client: OpenSearch
) -> None:
    """I3 and "a sink that lost its data is detected". The claim lives in the live index's
    ``_meta`` only, but the tombstones (and, for doc_id= views, the only record of which
    document an item owns) live in ``*.vk-owners``. That index lost (deleted, restored
    without it, ...) is not noticed: W1 of the next delete auto-creates it empty, verify()
    finds the claim intact, and a stale put after a delete resurrects the item."""
    store = MemoryStore()
    sink = make_sink()
    sink.prepare([ORDERS])
    ns = os_namespaces(sink, store, ORDERS)
    ns.claim()
    sink.apply([up(ORDERS, "o-1", 10, {"n": 10}), up(ORDERS, "o-2", 10, {"n": 10})])
    assert outcomes(sink.apply([rm(ORDERS, "o-1", 12)])) == ["applied"]
    names = sink.indexes(ORDERS)
    os_client.indices.delete(index=names.owners)

    noticed = False
    for batch in ([rm(ORDERS, "o-2", 13)], [up(ORDERS, "o-1", 11, {"n": 11})]):  # stale replay
        try:
            sink.apply(batch)
        except NamespaceLost as exc:
            noticed = True
            ns.lost(sink, exc)
    ns.verify()
    state = store.view_states()[ORDERS.name]
    docs = sink.live_documents(ORDERS)
    assert docs == {} or noticed or state.needs_rebuild, (
        f"o-1 deleted at 12 came back from a stale put at 11 and nothing was reported: {docs}"
    )


# =========================================================================================
# Redis
# =========================================================================================
@redis_view(table="atk", redis="cache", name="atk_vals")
def atk_vals(item: dict[str, Any]) -> Iterator[Entry]:
    yield Value(f"atk:{item['id']}", item["v"])


VALS = view_for(atk_vals)


def put(item: str, seq: int, value: str, gen: int = 1) -> Change:
    return Change(VALS, item, Version(gen, str(seq)), [Value(f"atk:{item}", value)])


def redis_namespaces(sink: RedisSink, store: MemoryStore) -> Namespaces:
    return Namespaces(registry_of(VALS), {("redis", "cache"): sink}, store, {"atk": OWNER_A})


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_a_redis_that_restarts_from_an_older_snapshot_is_reported(
    private_redis: RedisServer,
) -> None:
    """ "A sink that lost its data is detected and reported (needs_rebuild)". A Redis with
    RDB persistence (its default: ``save 3600 1 300 100 60 10000``), or with AOF
    ``appendfsync everysec``, or a replica promoted after a failover, comes back with
    the data of a moment ago: the claim (and its marker) is in that snapshot, the changes
    acknowledged since are not. The checkpoint moved past them, nothing notices: i2 is
    missing for good (I1), and needs_rebuild is never set."""
    client = redis.Redis.from_url(private_redis.url)
    sink = RedisSink("cache", url=private_redis.url, owner_buckets=16)
    store = MemoryStore()
    ns = redis_namespaces(sink, store)
    ns.claim()
    sink.prepare([VALS])
    assert outcomes(sink.apply([put("i1", 1, "one")])) == ["applied"]
    client.save()  # the last snapshot before the crash
    assert outcomes(sink.apply([put("i2", 2, "two")])) == ["applied"]  # acknowledged
    client.close()
    private_redis.kill()  # crash...
    private_redis.start()  # ...and restart from the snapshot
    client = redis.Redis.from_url(private_redis.url)
    assert client.get(b"atk:i1") == b"one"  # the snapshot is there

    noticed = False
    try:  # the stream goes on
        sink.apply([put("i3", 3, "three")])
    except NamespaceLost as exc:
        noticed = True
        ns.lost(sink, exc)
    ns.verify()
    state = store.view_states()[VALS.name]
    assert client.get(b"atk:i2") == b"two" or noticed or state.needs_rebuild, (
        "i2, acknowledged before the crash, is gone and nothing reported the loss "
        f"(needs_rebuild={state.needs_rebuild})"
    )
    sink.close()
    client.close()


def test_a_whole_call_refused_for_permissions_holds_the_batch_instead_of_dead_lettering(
    private_redis: RedisServer,
) -> None:
    """I5: "a sink's transient state holds the checkpoint and is retried". The sink's ACL
    user loses +evalsha (an ACL file reloaded during a credential rotation, a managed
    Redis' default user changed): the whole call is refused with NOPERM, which the sink
    takes for a change-specific refusal: every change is resent alone, refused again and
    reported ERROR -- the pipeline dead-letters every record of every view and moves the
    checkpoint, while the same state for OpenSearch (403) holds the batch."""
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("ACL", "SETUSER", "vk", "on", ">secret", "~*", "&*", "+@all")  # type: ignore[no-untyped-call]
    url = f"redis://vk:secret@127.0.0.1:{private_redis.port}/0"
    sink = RedisSink("cache", url=url, owner_buckets=16, retry_seconds=1.0)
    sink.prepare([VALS])
    assert outcomes(sink.apply([put("i1", 1, "one")])) == ["applied"]
    admin.execute_command("ACL", "SETUSER", "vk", "-evalsha")  # type: ignore[no-untyped-call]
    try:
        results = sink.apply([put("i1", 2, "two"), put("i2", 2, "two")])
    except Exception as exc:  # SinkUnavailable (or any raise): the batch is held
        results = []
        print(f"held: {type(exc).__name__}: {exc}")
    errors = [r.error for r in results if r.outcome is Outcome.ERROR]
    assert not errors, f"changes dead-lettered for the server's ACL state: {errors}"
    sink.close()
    admin.close()


def test_a_claim_refusal_in_a_call_resent_alone_is_not_reported_applied(
    private_redis: RedisServer,
) -> None:
    """I4/I5 and the claim check. A call refused as a whole ("none is foreseen": a call of
    several changes that Redis refuses here for its number of keys) is resent one change per
    call by ``_split_refused``, after ``_refuse_lost`` ran: a resent call that answers
    ``{'L', i}`` (the claim changed in between: another process re-armed the namespace,
    another deployment took it over) is read as a code string: 'L' is neither '0', '1',
    'x' nor 'e', and ``_result`` makes an APPLIED of it. The change is reported applied,
    nothing was written, the checkpoint moves past it. (The review refused the call with
    NOPERM; NOPERM now holds the batch, see the test above, so the refusal is another.)"""
    admin = redis.Redis.from_url(private_redis.url)
    sink = RedisSink("cache", url=private_redis.url, owner_buckets=16, retry_seconds=1.0)
    store = MemoryStore()
    ns = redis_namespaces(sink, store)
    ns.claim()
    sink.prepare([VALS])
    assert outcomes(sink.apply([put("i1", 1, "one")])) == ["applied"]

    real_command, real_split = sink._command, sink._split_refused

    def command(batch: Any, stamp: bytes) -> bytes:
        if len(batch.indexes) > 1:  # refused whole, not for the server's state
            sha = sink._apply_sha
            return b"*3\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$3\r\nnan\r\n" % (len(sha), sha)
        return real_command(batch, stamp)

    def split(batches: Any, stamp: bytes) -> Any:
        # between the refused call and the resends another process re-arms the namespace
        admin.hset(b"vk:atk_vals:ns", b"marker", b"re-armed-by-another-process")
        return real_split(batches, stamp)

    setattr(sink, "_command", command)  # noqa: B010 - an instance attribute over the method
    setattr(sink, "_split_refused", split)  # noqa: B010 - an instance attribute over the method
    try:
        results = sink.apply([put("i1", 2, "two"), put("i2", 2, "two")])
    except NamespaceLost:
        return  # the right answer: nothing was written, said so
    written = {k: admin.get(k) for k in (b"atk:i1", b"atk:i2")}
    assert all(r.outcome is not Outcome.APPLIED for r in results), (
        f"reported {outcomes(results)} but Redis holds {written}"
    )


# =========================================================================================
# OpenSearch: two shard workers applying at the same time (phases interleaved)
# =========================================================================================
_tags = iter(range(10**6))


def _steps(sink: OpenSearchSink, changes: list[Change]) -> Iterator[None]:
    """``apply`` with ``bulk_concurrency=1``, one request per step (the other worker may run
    between any two)."""
    plans = [sink._plan(ch) for ch in changes]
    sink._owner_phase(plans)
    yield
    checks = sink._live_phase(plans)
    yield
    if checks:
        sink._post_check(checks)
        yield
    sink._unpend_phase(plans)
    for p in plans:
        assert sink._result(p).outcome is not Outcome.ERROR, sink._result(p)


def _streams(
    tag: str, timeline: list[tuple[int, Any]], data: st.DataObject, seq_base: int = 0
) -> tuple[dict[int, list[Change]], dict[str, Any]]:
    holds: dict[int, int | None] = {0: None, 1: None}
    streams: dict[int, list[Change]] = {0: [], 1: []}
    final: dict[int, Any] = {}
    seq = {w: data.draw(st.integers(0, 10**6), label=f"first seq {w}") for w in (0, 1)}
    for who, state in timeline:
        if state is not None and holds[1 - who] == state[0]:
            continue
        holds[who] = None if state is None else state[0]
        seq[who] += data.draw(st.integers(1, 10**5), label="step")
        key = tag + NAMES[who]
        version = Version(1, str(10**20 + seq[who]))
        if state is None:
            ch = Change(CARDS, key, version, [])
        else:
            doc_id = f"{tag}d{state[0]}"
            ch = Change(
                CARDS,
                key,
                version,
                [Document(doc_id, {"card": doc_id, "who": NAMES[who], "n": state[1]})],
            )
        streams[who].append(ch)
        final[who] = (doc_id, ch.entries[0].body) if state is not None else None  # type: ignore[union-attr]
    want = {v[0]: v[1] for v in final.values() if v is not None}
    return streams, want


@needs_os
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(timeline=shared_timeline, data=st.data())
def test_two_shards_passing_document_ids_at_the_same_time_end_with_the_newest_owner(
    make_sink: Callable[..., OpenSearchSink], timeline: list[tuple[int, Any]], data: st.DataObject
) -> None:
    """The third property of test_sink_opensearch_properties, with the two shards' workers
    applying at the same time (as they do: one worker per shard, in threads or processes):
    the requests of their applies interleave in any order. Each worker applies its item's
    records in order, in pages (newest per page), sometimes killed between two requests
    (its page comes again)."""
    tag = f"c{next(_tags)}-"
    streams, want = _streams(tag, timeline, data)
    sinks = [make_sink(bulk_concurrency=1), make_sink(bulk_concurrency=1)]
    sinks[0].prepare([CARDS])
    sinks[1].prepare([CARDS])
    pages: dict[int, list[list[Change]]] = {}
    for w, stream in streams.items():
        n = len(stream)
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=4), label="cuts"))
        pages[w] = [
            _newest_per_item(stream[a:b])
            for a, b in zip([0, *cuts], [*cuts, n], strict=True)
            if a < b
        ]
    running: dict[int, Iterator[None] | None] = {0: None, 1: None}
    current: dict[int, list[Change]] = {}
    kills = 0
    while any(pages.values()) or any(running.values()):
        ready = [w for w in (0, 1) if running[w] is not None or pages[w]]
        w = data.draw(st.sampled_from(ready), label="who steps")
        if running[w] is None:
            current[w] = pages[w][0]
            sinks[w]._new_share = data.draw(st.sampled_from([0.0, 1.0]), label="try create")
            running[w] = _steps(sinks[w], current[w])
        if kills < 3 and data.draw(st.integers(0, 9), label="kill?") == 0:
            kills += 1
            running[w] = None  # killed between two requests: the page comes again
            continue
        try:
            next(running[w])  # type: ignore[arg-type]
        except StopIteration:
            running[w] = None
            pages[w].pop(0)
    live = {k: v for k, v in sinks[0].live_documents(CARDS).items() if k.startswith(tag)}
    assert live == want, {
        "streams": {
            w: [
                (c.version.sequence[-6:], [getattr(d, "doc_id", None) for d in c.entries])
                for c in s
            ]
            for w, s in streams.items()
        }
    }


# =========================================================================================
# OpenSearch: a custom-id move whose new document OpenSearch rejects is half-applied
# =========================================================================================
@needs_os
def test_a_rejected_move_of_a_custom_id_document_leaves_the_item_as_it_was(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """I5: "a change is never half-applied"; ERROR means "this change alone cannot be
    applied" and the record is dead-lettered. Item i holds document a; its change moves
    it to document b with a body the mapping refuses (``total`` mapped as a long gets an
    object: mapper_parsing_exception, ``test_mapping_rejection_is_an_error_for_that_change
    _only``). W1 has already moved i's owner record to b with a pending, and the pending
    delete of a rides in the same ``_bulk`` as the put of b: the put fails, the delete
    does not. The change is ERROR (dead-lettered) but half of it happened: i has no
    document at all any more -- neither its last good one (a) nor the new one."""
    sink = make_sink(bulk_concurrency=1)
    sink.prepare([CARDS])
    assert outcomes(sink.apply([up(CARDS, "i", 10, {"card": "a", "total": 5})])) == ["applied"]
    [result] = sink.apply([up(CARDS, "i", 11, {"card": "b", "total": {"amount": 7}})])
    assert result.outcome is Outcome.ERROR and "mapper_parsing_exception" in (result.error or "")
    docs = sink.live_documents(CARDS)
    assert docs == {"a": {"card": "a", "total": 5}}, (
        f"the ERROR change deleted the item's document and wrote none: {docs}"
    )


# =========================================================================================
# OpenSearch: the rebuild's sweep in the middle of an older generation's apply
# =========================================================================================
@needs_os
def test_a_sweep_between_w1_and_the_post_check_of_an_older_generation_leaves_no_orphan(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """I6/I1, white-box race (like test_a_stale_put_taking_a_document_over_...). Item i
    (custom id) holds a at (1, 10). Its change moving to b at (1, 20) was read before the
    rebuild's handshake (generation 1) and is being applied: W1 is written (record (1, 20),
    doc b, pending a); its put is retried behind 429s. Meanwhile i is deleted from the
    table, the rebuild to generation 2 scans (i is gone) and sweeps: the live sweep
    deletes a, the owner sweep deletes i's record (generation 1, with doc). Then the put of
    b lands (created, generation 1) and its post-check finds NO owner record -- which it
    takes for "nothing newer": no fix. The delete of i (2, 30) comes next: its W1 finds no
    record, so no document to delete. b stays in the alias, owned by nobody, until some
    later rebuild."""
    a, b = make_sink(bulk_concurrency=1), make_sink(bulk_concurrency=1)
    a.prepare([CARDS])
    assert outcomes(a.apply([up(CARDS, "i", 10, {"card": "a"}, gen=1)])) == ["applied"]
    [move] = [a._plan(up(CARDS, "i", 20, {"card": "b"}, gen=1))]
    a._owner_phase([move])  # W1 of the old generation's change
    b.sweep(CARDS, 2, 0.0)  # the rebuild to generation 2 (its scan did not find i)
    checks = a._live_phase([move])  # the put lands after the sweep: created
    if checks:
        a._post_check(checks)
    a._unpend_phase([move])
    assert outcomes(b.apply([rm(CARDS, "i", 30, gen=2)])) in (["applied"], ["stale"])
    docs = b.live_documents(CARDS)
    assert docs == {}, f"i is deleted, its document stays: {docs}"


@needs_os
def test_an_item_the_rebuild_could_not_write_keeps_its_last_good_document(
    make_sink: Callable[..., OpenSearchSink],
) -> None:
    """Sink.sweep: "except the items in keep (those the rebuild's scan could not project or
    write: they keep their last good entries)". The rebuild's scan writes i at (2, 0) with
    a document id that moved (a -> b) and a body the mapping refuses: ERROR, i goes to
    ``keep``. But W1 had moved i's owner record and the delete of a went out with the
    refused put: the sweep has nothing left to spare, i has no document."""
    sink = make_sink(bulk_concurrency=1)
    sink.prepare([CARDS])
    assert outcomes(sink.apply([up(CARDS, "i", 10, {"card": "a", "total": 5}, gen=1)])) == [
        "applied"
    ]
    [scan] = sink.apply([up(CARDS, "i", 0, {"card": "b", "total": {"amount": 7}}, gen=2)])
    assert scan.outcome is Outcome.ERROR
    sink.sweep(CARDS, 2, 0.0, keep={"i"})
    docs = sink.live_documents(CARDS)
    assert docs == {"a": {"card": "a", "total": 5}}, f"i's last good document is gone: {docs}"


@needs_os
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(timeline=shared_timeline, data=st.data())
def test_two_shards_with_lease_handovers_and_replays_end_with_the_newest_owner(
    make_sink: Callable[..., OpenSearchSink], timeline: list[tuple[int, Any]], data: st.DataObject
) -> None:
    """As above, plus lease handovers: the holder's page in flight goes on to the end (it
    is not killed) while the new holder (another sink) applies the same page from the
    checkpoint and the pages after it; and replays of earlier records."""
    tag = f"h{next(_tags)}-"
    streams, want = _streams(tag, timeline, data)
    for stream in streams.values():
        for _ in range(data.draw(st.integers(0, 2), label="replays") if stream else 0):
            at = data.draw(st.integers(0, len(stream)), label="replayed at")
            earlier = data.draw(st.integers(0, max(0, at - 1)), label="replayed record")
            stream.insert(at, stream[min(earlier, len(stream) - 1)])
    sinks = [make_sink(bulk_concurrency=1) for _ in range(3)]
    sinks[0].prepare([CARDS])
    for s in sinks[1:]:
        s.prepare([CARDS])
    pages: dict[int, list[list[Change]]] = {}
    for w, stream in streams.items():
        n = len(stream)
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=4), label="cuts"))
        pages[w] = [
            _newest_per_item(stream[a:b])
            for a, b in zip([0, *cuts], [*cuts, n], strict=True)
            if a < b
        ]
    holder = {0: 0, 1: 1}
    running: dict[int, Iterator[None] | None] = {0: None, 1: None}
    orphans: list[Iterator[None]] = []
    handovers = 0
    while any(pages.values()) or any(running.values()) or orphans:
        choices = [("w", w) for w in (0, 1) if running[w] is not None or pages[w]]
        choices += [("o", i) for i in range(len(orphans))]
        kind, w = data.draw(st.sampled_from(choices), label="who steps")
        if kind == "o":
            try:
                next(orphans[w])
            except StopIteration:
                orphans.pop(w)
            continue
        if running[w] is None:
            sink = sinks[holder[w]]
            sink._new_share = data.draw(st.sampled_from([0.0, 1.0]), label="try create")
            running[w] = _steps(sink, pages[w][0])
        elif handovers < 2 and data.draw(st.integers(0, 7), label="handover?") == 0:
            handovers += 1
            orphans.append(running[w])  # type: ignore[arg-type]
            holder[w] = next(i for i in range(3) if i not in holder.values())
            running[w] = None  # the new holder applies the page again from the checkpoint
            continue
        try:
            next(running[w])  # type: ignore[arg-type]
        except StopIteration:
            running[w] = None
            pages[w].pop(0)
    live = {k: v for k, v in sinks[0].live_documents(CARDS).items() if k.startswith(tag)}
    assert live == want, {
        "streams": {
            w: [
                (c.version.sequence[-6:], [getattr(d, "doc_id", None) for d in c.entries])
                for c in s
            ]
            for w, s in streams.items()
        }
    }
