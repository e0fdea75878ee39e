"""Third attack round on aggregate views (Counter, SortedSetCounter): the fixes made after the
second round (README.md, "Aggregate views"; viewkeeper/sinks/redis/README.md, "Counters",
"Through a rebuild"): the 'x' mark of a change at or below the floor, begin_rebuild keeping
a lower floor, and a change counted in the rebuild's sums no longer refused for a live sum
it cannot compute. Against the real redis-server; each test fails on the code it was
written against.

Driven through the sink's own methods in the order ``rebuild()`` (runtime/rebuild.py) calls
them: ``begin_rebuild(view, floor)`` with the generation read before it raises it, the
scan's changes at ``(G, 0)``, ``sweep(view, G, ...)``; stream records are changes stamped
with the generation their reader held."""

from __future__ import annotations

from typing import Any

import pytest

from tests.counter_support import INT64_MAX, MONEY, SEQ, applied, change, sink  # noqa: F401

# ruff: noqa: F811 - the tests take the fixture `sink` imported above
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, SinkError
from viewkeeper.sinks.redis import RedisSink


def test_a_change_whose_sum_leaves_its_range_during_a_rebuild_is_lost_for_good(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a sum that would leave its range is an ERROR for that change (dead-lettered,
    nothing written), never silently dropped; a counter equals the sum over the items that
    yield it (I1, I5).

    A (2**63 - 1) and B (-10) count into sum:x (2**63 - 11, in range). A rebuild begins
    (floor 0, generation 1). Before the scan reaches A or B, the stream creates C with 20:
    the true sum 2**63 + 9 is out of range, but C counts in the rebuild's sums (20#1, in
    range so far), so the live overflow no longer refuses it: C is reported APPLIED, the live
    sum left at 2**63 - 11, only the claim count raised ("the rebuild sets the sum"). The
    scan then re-reads A: the rebuild's partial sum leaves its range ('x'), so the settling
    step leaves sum:x alone. C's +20 was never added, yet C's owner record holds it: when C
    is deleted, its REMOVE subtracts 20 -> 2**63 - 31, although A and B sum to 2**63 - 11.
    Refusing C (as without a rebuild) would have kept 2**63 - 11 throughout."""
    c = redis_client
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", SEQ + 1, {"g": "x", "a": INT64_MAX}),
                change(MONEY, "B", SEQ + 1, {"g": "x", "a": -10}),
            ]
        )
    )
    sink.begin_rebuild(MONEY, 0)  # then raise_generation -> 1
    [rc] = sink.apply([change(MONEY, "C", SEQ + 2, {"g": "x", "a": 20}, gen=1)])
    sink.apply(  # the scan: A, B unchanged (C's re-read is stale)
        [
            change(MONEY, "A", 0, {"g": "x", "a": INT64_MAX}, gen=1),
            change(MONEY, "B", 0, {"g": "x", "a": -10}, gen=1),
            change(MONEY, "C", 0, {"g": "x", "a": 20}, gen=1),
        ]
    )
    sink.sweep(MONEY, 1, 0)
    assert applied(sink.apply([change(MONEY, "C", SEQ + 3, None, gen=1)]))  # C deleted
    assert c.get("sum:x") == str(INT64_MAX - 10).encode(), f"C was {rc.outcome}"


def test_a_begin_rebuild_never_followed_by_its_raise_leaves_every_moved_counter_unrepairable(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild repairs a counter changed or deleted outside viewkeeper (the
    only ones left live are those a record read *before that rebuild began* moved
    meanwhile).

    rebuild() calls begin_rebuild for each view, then raises their generations. `viewkeeper
    rebuild money3 other` whose begin_rebuild of `other` fails (its sink unreachable past
    the retry, a refusal), or a kill -9 between the begin and the raise, leaves money3's
    field shadow = its *current* generation (0), never raised, never closed. From then on
    every stream record (generation 0: at the floor, not above) that moves a counter marks
    it 'x' in the sums, as if it were a late page. Days later sum:x is changed outside
    viewkeeper and the operator runs the rebuild again: its begin_rebuild keeps the old
    shadow (floor 0 <= 0) with its 'x' marks, so sum:x, moved by an ordinary record long
    before this rebuild, is left as the foreign value: 999 instead of A's 5."""
    c = redis_client
    assert applied(sink.apply([change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3})]))
    sink.begin_rebuild(MONEY, 0)  # the next view's begin_rebuild fails: nothing raised
    # the stream goes on at generation 0, as always
    assert applied(sink.apply([change(MONEY, "A", SEQ + 2, {"g": "x", "a": 5})]))
    c.set("sum:x", 999)  # outside viewkeeper, later
    sink.begin_rebuild(MONEY, 0)  # the operator's rebuild: raise -> 1
    assert applied(sink.apply([change(MONEY, "A", 0, {"g": "x", "a": 5}, gen=1)]))
    sink.sweep(MONEY, 1, 0)
    assert c.get("sum:x") == b"5"


def test_a_begin_rebuild_with_a_lower_floor_deletes_the_sums_and_the_rebuild_deletes_counters(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild while the stream flows (or beside another rebuild) leaves every
    counter equal to the sum over the table's current items (A 3 + C 4 = 7).

    R0 rebuilds money3 (floor 0 -> generation 1) and ends. R2 read the generations before
    R0 raised (money3 = 0) and is slow to reach its begin_rebuild (another sink's begin
    retried through an outage). Meanwhile R1 begins with floor 1, raises to 2 and re-reads A
    and C at (2, 0): its sums hold 7#2. R2's begin_rebuild(money3, 0) finds floor 1 > 0:
    it DELetes R1's sums and sets floor 0. R2 raises to 3 and re-reads A and C: their bodies
    are unchanged and their records (generation 2) are above floor 0, so nothing is added
    to the (now empty) sums. R1's settling step sees another floor and leaves it to R2; R2's
    finds no sum for sum:x and deletes it, although A and C yield 7 (sums.py begin_rebuild
    keeps only a floor at or below the requested one; a lower request starts from empty
    sums while treating every record above it as counted)."""
    c = redis_client
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3}),
                change(MONEY, "C", SEQ + 1, {"g": "x", "a": 4}),
            ]
        )
    )
    floors_r2 = 0  # R2 reads store.generations() now, then stalls
    sink.begin_rebuild(MONEY, 0)  # R0, raise -> 1
    rescan = [
        change(MONEY, "A", 0, {"g": "x", "a": 3}, gen=1),
        change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=1),
    ]
    assert applied(sink.apply(rescan))
    sink.sweep(MONEY, 1, 0)
    assert c.get("sum:x") == b"7"
    sink.begin_rebuild(MONEY, 1)  # R1, raise -> 2
    assert applied(
        sink.apply([Change(x.view, x.item_key, Version(2, "0"), x.entries) for x in rescan])
    )
    sink.begin_rebuild(MONEY, floors_r2)  # R2, late; raise -> 3
    assert applied(
        sink.apply([Change(x.view, x.item_key, Version(3, "0"), x.entries) for x in rescan])
    )
    sink.sweep(MONEY, 2, 0)  # R1 ends
    sink.sweep(MONEY, 3, 0)  # R2 ends
    assert c.get("sum:x") == b"7"


def test_the_sweep_drops_the_claim_of_a_foreign_value_and_the_rebuild_never_removes_it(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a counter no item contributes to is absent; a rebuild repairs a counter
    changed outside viewkeeper (the operator's answer to an ERROR naming a foreign value).

    A (3) is sum:x's only contributor. Another program writes "oops" at sum:x; A is then
    deleted from the table and its REMOVE is never applied (the shard was trimmed), so the
    operator rebuilds. The scan finds no item; the sweep retracts A at the rebuild's
    generation: that change counts in the rebuild's sums, so the non-integer live place no
    longer refuses it: the place is left as is ("the rebuild sets the sum") and, the count
    reaching 0, the claim is removed. The settling step then visits only counters in the
    sums or claimed by the view: sum:x is in neither, so "oops" stays for good, with no
    claim, no log line naming it, and no later rebuild that could see it."""
    c = redis_client
    assert applied(sink.apply([change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3})]))
    c.set("sum:x", "oops")  # outside viewkeeper
    sink.begin_rebuild(MONEY, 0)  # raise -> 1; the scan reads nothing (A is gone)
    # Chosen: the retraction is refused, loudly (the sweep raises, naming the value and
    # the fix), never dropped silently; done as it says, the next rebuild leaves nothing.
    with pytest.raises(SinkError, match=r"holds 'oops', not an integer.*delete it"):
        sink.sweep(MONEY, 1, 0)
    c.delete("sum:x")
    sink.begin_rebuild(MONEY, 1)
    sink.sweep(MONEY, 2, 0)
    assert c.get("sum:x") is None and not any(c.scan_iter(b"vk:c:*"))
