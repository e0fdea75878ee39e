"""Property: any delivery of any history converges to the projection of the final states.

Random histories of a few items (upserts and removals at distinct versions — 21- and
40-digit sequence numbers, several generations), delivered in random batches with
duplicates, reorderings and replays, to a default-id view and to a custom-id view whose
document moves between two ids. Afterwards the alias holds exactly the documents of each
item's newest state (I1, I2, I3), against the real OpenSearch node.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opensearchpy import OpenSearch

from viewkeeper.projection.api import View, opensearch_view, view_of
from viewkeeper.projection.entries import Document
from viewkeeper.sinks.base import Change, Outcome
from viewkeeper.sinks.opensearch import OpenSearchSink
from viewkeeper.versions import Version

pytestmark = pytest.mark.opensearch


@opensearch_view(table="orders", opensearch="search", index="orders")
def orders(item: dict[str, Any]) -> dict[str, Any]:
    return item


@opensearch_view(
    table="orders", opensearch="search", index="order-cards", doc_id=lambda i: str(i["card"])
)
def order_cards(item: dict[str, Any]) -> dict[str, Any]:
    return item


def _view(func: object) -> View:
    view = view_of(func)
    assert view is not None
    return view


ORDERS = _view(orders)
CARDS = _view(order_cards)
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

_examples = itertools.count()


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
