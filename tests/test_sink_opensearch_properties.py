"""Property: any delivery of any history converges to the projection of the final states.

Random histories of a few items (upserts and removals at distinct versions — 21- and
40-digit sequence numbers, several generations), delivered in random batches with
duplicates, reorderings and replays, to a default-id view and to a custom-id view whose
document moves between two ids. Afterwards the alias holds exactly the documents of each
item's newest state (I1, I2, I3), against the real OpenSearch node.

The second property kills the applying daemon after any request of a batch (I4): the batch
comes again, alone or in one page with the next batch, where only each item's newest
record is applied (the shard worker coalesces a page per item) — the way a restarted
daemon reads on from the checkpoint that did not move.

The third passes document ids between two items of a custom-id view, as two shards deliver
them: one timeline of the table (a document id is never yielded by both items at once),
each item's records in its own order — sequence numbers of the two items drawn apart, so
they say nothing about which change came first — with replays of earlier records, the two
streams interleaved at random. The alias must hold each item's newest document.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opensearchpy import OpenSearch

from tests.test_sink_opensearch import CARDS, ORDERS, Killed, kill_at
from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Document
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.opensearch import OpenSearchSink

pytestmark = pytest.mark.opensearch


ITEMS = ("i0", "i1", "i2", "i3")

sequences = st.one_of(
    st.integers(0, 60),
    st.integers(10**20, 10**20 + 60),  # 21 digits
    st.integers(10**39 - 30, 10**39 + 30),  # 39/40 digits, neighbours a double merges
    st.integers(10**39, 10**40 - 1),
).map(str)
versions = st.builds(Version, st.integers(0, 2), sequences)
states = st.one_of(
    st.none(), st.fixed_dictionaries({"n": st.integers(0, 9), "slot": st.integers(0, 1)})
)
history = st.lists(
    st.tuples(st.sampled_from(ITEMS), versions, states),
    min_size=1,
    max_size=14,
    unique_by=lambda e: (e[0], e[1].encode()),
)
# for the kills: fewer items, more changes each, three document ids per item
kill_history = st.lists(
    st.tuples(
        st.sampled_from(ITEMS[:2]),
        versions,
        st.one_of(
            st.none(), st.fixed_dictionaries({"n": st.integers(0, 9), "slot": st.integers(0, 2)})
        ),
    ),
    min_size=4,
    max_size=12,
    unique_by=lambda e: (e[0], e[1].encode()),
)

_examples = itertools.count()
MAX_KILLS = 6


@pytest.fixture
def sinks(os_client: OpenSearch, os_prefix: str) -> Iterator[list[OpenSearchSink]]:
    """Two sinks on the same indexes, like two daemons: each has its own cache of what it
    wrote, so batches alternating between them exercise the fast paths' fallbacks."""
    made = [
        OpenSearchSink(
            "search",
            os_client,
            index_prefix=os_prefix,
            min_split=2,
            index_settings={"number_of_replicas": 0},
        )
        for _ in range(2)
    ]
    made[0].prepare([ORDERS, CARDS])
    yield made
    for s in made:
        s.close()


def _change(
    view: View, tag: str, item: str, version: Version, state: dict[str, Any] | None
) -> Change:
    key = tag + item
    if state is None:
        return Change(view, key, version, [])
    body = {"n": state["n"], "card": f"{key}-{state['slot']}"}
    doc_id = body["card"] if view.doc_id is not None else key
    return Change(view, key, version, [Document(doc_id, body)])


def _expected(view: View, tag: str, events: list[tuple[str, Version, Any]]) -> dict[str, Any]:
    final: dict[str, tuple[Version, Any]] = {}
    for item, version, state in events:
        if item not in final or version > final[item][0]:
            final[item] = (version, state)
    docs: dict[str, Any] = {}
    for item, (_, state) in final.items():
        change = _change(view, tag, item, Version(0, "0"), state)
        for doc in change.entries:
            assert isinstance(doc, Document)
            docs[doc.doc_id] = doc.body
    return docs


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=history, data=st.data())
def test_any_delivery_of_any_history_holds_exactly_the_final_projection(
    sinks: list[OpenSearchSink], events: list[tuple[str, Version, Any]], data: st.DataObject
) -> None:
    # The fixture is made once for all examples; each example uses its own item keys.
    tag = f"e{next(_examples)}-"
    # every record at least once, some again (replays), in any order, in batches
    extra = data.draw(st.lists(st.sampled_from(range(len(events))), max_size=8), label="replays")
    order = data.draw(st.permutations(list(range(len(events))) + extra), label="order")
    cuts = sorted(
        data.draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4), label="cuts")
    )
    batches = [order[a:b] for a, b in itertools.pairwise([0, *cuts, len(order)]) if a < b]
    for batch in batches:
        sink = sinks[data.draw(st.integers(0, 1), label="daemon")]
        sink._new_share = data.draw(st.sampled_from([0.0, 1.0]), label="try create")
        changes = [_change(view, tag, *events[i]) for i in batch for view in (ORDERS, CARDS)]
        results = sink.apply(changes)
        assert all(r.outcome is not Outcome.ERROR for r in results), results
    for view in (ORDERS, CARDS):
        live = {k: v for k, v in sinks[0].live_documents(view).items() if k.startswith(tag)}
        assert live == _expected(view, tag, events), view.name


def _coalesce(batch: list[int], events: list[tuple[str, Version, Any]]) -> list[int]:
    """One page as the shard worker applies it: each item's newest record only."""
    newest: dict[str, int] = {}
    for i in batch:
        item, version, _ = events[i]
        if item not in newest or version > events[newest[item]][1]:
            newest[item] = i
    return [i for i in dict.fromkeys(batch) if newest[events[i][0]] == i]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=kill_history, data=st.data())
def test_a_daemon_killed_after_any_request_loses_nothing_and_orphans_nothing(
    os_client: OpenSearch,
    os_prefix: str,
    events: list[tuple[str, Version, Any]],
    data: st.DataObject,
) -> None:
    tag = f"e{next(_examples)}-"
    if data.draw(st.booleans(), label="in stream order"):
        order = sorted(range(len(events)), key=lambda i: events[i][1])
    else:
        order = data.draw(st.permutations(range(len(events))), label="order")
    n = len(order)
    cuts = sorted(
        data.draw(
            st.sets(st.integers(1, max(1, n - 1)), min_size=min(n - 1, 2), max_size=8),
            label="cuts",
        )
    )
    queue = [order[a:b] for a, b in itertools.pairwise([0, *cuts, n]) if a < b]
    # Everything drawn up front, so that what is drawn never depends on where a kill fell.
    # Per attempt: which daemon, whether it tries create first, the request it is killed
    # after (-1: not killed; an apply makes 1-6 requests), and whether the batch comes
    # again in one page with the next.
    attempt = st.tuples(st.integers(0, 1), st.booleans(), st.integers(-1, 5), st.booleans())
    plan = data.draw(
        st.lists(attempt, min_size=len(queue) + MAX_KILLS, max_size=len(queue) + MAX_KILLS)
    )
    # Fresh daemons each with their own cache, one request at a time: a request number
    # names the same step when Hypothesis runs the example again.
    sinks = [
        OpenSearchSink(
            "search",
            os_client,
            index_prefix=os_prefix,
            bulk_concurrency=1,
            index_settings={"number_of_replicas": 0},
        )
        for _ in range(2)
    ]
    try:
        sinks[0].prepare([ORDERS, CARDS])
        kills = 0
        for daemon, try_create, kill, next_page in plan:
            if not queue:
                break
            batch = queue.pop(0)
            sink = sinks[daemon]
            sink._new_share = 1.0 if try_create else 0.0
            if kill >= 0 and kills < MAX_KILLS:
                kill_at(sink, lambda n, _, k=kill: n == k, sent=True)
            changes = [_change(view, tag, *events[i]) for i in batch for view in (ORDERS, CARDS)]
            try:
                results = sink.apply(changes)
            except Killed:
                kills += 1
                # the checkpoint did not move: the batch comes again, maybe in one page with
                # the next batch (coalesced)
                if queue and next_page:
                    queue[0] = _coalesce(batch + queue[0], events)
                else:
                    queue.insert(0, batch)
                continue
            finally:
                vars(sink).pop("_post", None)  # a kill that did not happen
            assert all(r.outcome is not Outcome.ERROR for r in results), results
        assert not queue
        if kills:
            # A restarted daemon reads on from its checkpoint: whatever the killed batch
            # held, each item's newest record comes after it (here the history's order is
            # free, so it comes once more at the end). The sink relies on that to undo a
            # stale upsert killed between its put and its post-check (see its README.md).
            newest = _coalesce(list(range(len(events))), events)
            results = sinks[0].apply(
                [_change(view, tag, *events[i]) for i in newest for view in (ORDERS, CARDS)]
            )
            assert all(r.outcome is not Outcome.ERROR for r in results), results
        for view in (ORDERS, CARDS):
            live = {k: v for k, v in sinks[0].live_documents(view).items() if k.startswith(tag)}
            assert live == _expected(view, tag, events), view.name
    finally:
        for s in sinks:
            s.close()


# ---- document ids passed between items (two shards) -----------------------------------------

SHARED_DOCS = 3
shared_timeline = st.lists(
    st.tuples(
        st.integers(0, 1),  # which item
        st.one_of(st.none(), st.tuples(st.integers(0, SHARED_DOCS - 1), st.integers(0, 9))),
    ),
    min_size=2,
    max_size=12,
)
NAMES = ("X", "Y")


def _shared_change(tag: str, who: int, seq: int, state: tuple[int, int] | None) -> Change:
    key = tag + NAMES[who]
    version = Version(1, str(10**20 + seq))  # 21 digits, like DynamoDB's
    if state is None:
        return Change(CARDS, key, version, [])
    doc_id = f"{tag}d{state[0]}"
    body = {"card": doc_id, "who": NAMES[who], "n": state[1]}
    return Change(CARDS, key, version, [Document(doc_id, body)])


def _shared_delivery(
    tag: str, timeline: list[tuple[int, Any]], data: st.DataObject
) -> tuple[list[Change], dict[str, Any]]:
    """The records of two items on two shards as a daemon sees them, and the documents the
    alias must end with. The table's timeline: an event that would give an item a document
    the other item holds at that moment is left out (that would be a bug of the view, not a
    move). Each item's sequence numbers rise; the two items' are drawn apart. Each shard's
    records come in order, some delivered again later (replays); the shards interleave."""
    holds: dict[int, int | None] = {0: None, 1: None}
    streams: dict[int, list[Change]] = {0: [], 1: []}
    final: dict[int, tuple[int, int] | None] = {}
    seq = {who: data.draw(st.integers(0, 10**6), label=f"first seq {NAMES[who]}") for who in (0, 1)}
    for who, state in timeline:
        if state is not None and holds[1 - who] == state[0]:
            continue
        holds[who] = None if state is None else state[0]
        seq[who] += data.draw(st.integers(1, 10**5), label="step")
        streams[who].append(_shared_change(tag, who, seq[who], state))
        final[who] = state
    for stream in streams.values():
        for _ in range(data.draw(st.integers(0, 3), label="replays") if stream else 0):
            at = data.draw(st.integers(0, len(stream)), label="replayed at")
            earlier = data.draw(st.integers(0, max(0, at - 1)), label="replayed record")
            stream.insert(at, stream[min(earlier, len(stream) - 1)])
    merged: list[Change] = []
    while streams[0] or streams[1]:
        who = data.draw(st.integers(0, 1), label="next shard") if all(streams.values()) else 0
        merged.append(streams[who if streams[who] else 1 - who].pop(0))
    want = {}
    for who, state in final.items():
        if state is not None:
            change = _shared_change(tag, who, 0, state)
            want.update({d.doc_id: d.body for d in change.entries if isinstance(d, Document)})
    return merged, want


def _newest_per_item(batch: list[Change]) -> list[Change]:
    """One page as the shard worker applies it: each item's newest record only, once."""
    newest = {ch.item_key: ch for ch in sorted(batch, key=lambda ch: ch.version)}
    return list({id(ch): ch for ch in batch if newest[ch.item_key] is ch}.values())


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(timeline=shared_timeline, data=st.data())
def test_document_ids_passed_between_items_of_two_shards_end_with_the_newest_owner(
    sinks: list[OpenSearchSink], timeline: list[tuple[int, Any]], data: st.DataObject
) -> None:
    tag = f"e{next(_examples)}-"
    merged, want = _shared_delivery(tag, timeline, data)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(merged) - 1)), max_size=4)))
    for a, b in itertools.pairwise([0, *cuts, len(merged)]):
        batch = merged[a:b]
        if not batch:
            continue
        if data.draw(st.booleans(), label="one page (newest per item)"):
            batch = _newest_per_item(batch)
        sink = sinks[data.draw(st.integers(0, 1), label="daemon")]
        sink._new_share = data.draw(st.sampled_from([0.0, 1.0]), label="try create")
        results = sink.apply(batch)
        assert all(r.outcome is not Outcome.ERROR for r in results), results
    live = {k: v for k, v in sinks[0].live_documents(CARDS).items() if k.startswith(tag)}
    assert live == want


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(timeline=shared_timeline, data=st.data())
def test_document_ids_passed_between_items_survive_a_daemon_killed_after_any_request(
    os_client: OpenSearch, os_prefix: str, timeline: list[tuple[int, Any]], data: st.DataObject
) -> None:
    """The same deliveries, the applying daemon killed after any request of a batch (as in
    the second property): the batch comes again, alone or in one page with the next."""
    tag = f"e{next(_examples)}-"
    merged, want = _shared_delivery(tag, timeline, data)
    n = len(merged)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=6), label="cuts"))
    queue = [merged[a:b] for a, b in itertools.pairwise([0, *cuts, n]) if a < b]
    attempt = st.tuples(st.integers(0, 1), st.booleans(), st.integers(-1, 5), st.booleans())
    plan = data.draw(
        st.lists(attempt, min_size=len(queue) + MAX_KILLS, max_size=len(queue) + MAX_KILLS)
    )
    sinks = [
        OpenSearchSink(
            "search",
            os_client,
            index_prefix=os_prefix,
            bulk_concurrency=1,
            index_settings={"number_of_replicas": 0},
        )
        for _ in range(2)
    ]
    try:
        sinks[0].prepare([CARDS])
        kills = 0
        for daemon, try_create, kill, next_page in plan:
            if not queue:
                break
            batch = queue.pop(0)
            sink = sinks[daemon]
            sink._new_share = 1.0 if try_create else 0.0
            if kill >= 0 and kills < MAX_KILLS:
                kill_at(sink, lambda n, _, k=kill: n == k, sent=True)
            try:
                results = sink.apply(batch)
            except Killed:
                kills += 1
                if queue and next_page:
                    queue[0] = _newest_per_item(batch + queue[0])
                else:
                    queue.insert(0, batch)
                continue
            finally:
                vars(sink).pop("_post", None)  # a kill that did not happen
            assert all(r.outcome is not Outcome.ERROR for r in results), results
        assert not queue
        if kills:
            # each item's newest record comes after the killed batch (the second property)
            results = sinks[0].apply(_newest_per_item(merged))
            assert all(r.outcome is not Outcome.ERROR for r in results), results
        live = {k: v for k, v in sinks[0].live_documents(CARDS).items() if k.startswith(tag)}
        assert live == want
    finally:
        for s in sinks:
            s.close()
