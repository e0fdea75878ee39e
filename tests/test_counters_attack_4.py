"""Fourth attack round on aggregate views (Counter, SortedSetCounter): the '^' rule of
begin_rebuild (viewkeeper/sinks/redis/sums.py; README.md, "Counters", "Through a rebuild"):
sums that counted a change above their floor are kept, any others are replaced by empty
sums at the lower of the two floors. Against the real redis-server; each test fails on the
code it was written against.

Driven through the sink's own methods in the order ``rebuild()`` (runtime/rebuild.py) calls
them: ``begin_rebuild(view, floor)`` with the generation read before it raises it, the
scan's changes at ``(G, 0)``, ``sweep(view, G, ...)``; stream records are changes stamped
with the generation their reader held."""

from __future__ import annotations

from typing import Any

import pytest

from tests.counter_support import INT64_MAX, MONEY, SEQ, applied, change, sink  # noqa: F401

# ruff: noqa: F811 - the tests take the fixture `sink` imported above
from viewkeeper.sinks.redis import RedisSink


def rebuild_once(sink: RedisSink, floor: int, gen: int, items: dict[str, dict[str, Any]]) -> None:
    """A whole rebuild: begin, (raise to gen), scan, sweep."""
    sink.begin_rebuild(MONEY, floor)
    assert applied(sink.apply([change(MONEY, k, 0, s, gen=gen) for k, s in items.items()]))
    sink.sweep(MONEY, gen, 0)


def test_a_lower_floor_empties_the_sums_of_a_raised_rebuild_that_counted_nothing_yet(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild while the stream flows (or beside another rebuild) leaves every
    counter equal to the sum over the table's current items (A 3 + C 4 = 7).

    R0 rebuilds money4 (floor 0 -> generation 1, records of A and C at generation 1) and
    ends. R2 read the generations before R0 raised (money4 = 0) and is slow to reach its
    begin_rebuild. R1 begins with floor 1 and raises to 2; before its scan counts anything
    (no '^' yet) R2's late begin_rebuild(money4, 0) arrives: the sums hold nothing worth
    keeping, so the lower floor, 0, and empty sums. But A's and C's records (generation 1)
    are above 0 and in no sum. R1's scan re-reads them at (2, 0): unchanged bodies, records
    above the floor -> nothing is added. R1's sweep settles from floor 0 < 2: no sum for
    sum:x -> the counter is deleted although A and C yield 7. Empty sums are exact only at
    a floor no record is above; the lower floor is not one."""
    c = redis_client
    items = {"A": {"g": "x", "a": 3}, "C": {"g": "x", "a": 4}}
    assert applied(sink.apply([change(MONEY, k, SEQ, s) for k, s in items.items()]))
    rebuild_once(sink, 0, 1, items)  # R0
    assert c.get("sum:x") == b"7"
    sink.begin_rebuild(MONEY, 1)  # R1: floor 1, raise -> 2
    sink.begin_rebuild(MONEY, 0)  # R2, floors read before R0 raised; raises -> 3 later
    assert applied(sink.apply([change(MONEY, k, 0, s, gen=2) for k, s in items.items()]))
    sink.sweep(MONEY, 2, 0)  # R1 ends
    assert c.get("sum:x") == b"7"


def test_a_begin_rebuild_whose_floor_is_below_records_already_written_deletes_counters(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild leaves every counter equal to the sum over the table's items
    (A 3 + C 4 = 7), whichever rebuild ran before.

    R2 reads the generations (money4 = 0) and is slow to reach its begin_rebuild (another
    view's begin retried through an outage). Meanwhile R0 rebuilds money4 (floor 0 ->
    generation 1: A and C re-read at (1, 0)), settles and drops its sums. R2's
    begin_rebuild(money4, 0) finds no sums: floor 0, empty sums — with every record at
    generation 1, above 0, in none of them. R2 raises to 2, re-reads A and C: unchanged,
    records above the floor: nothing added. R2's sweep deletes sum:x. (In rebuild() the
    view's claim records the generation R0 announced, 1: the floor could be at least that.)"""
    c = redis_client
    items = {"A": {"g": "x", "a": 3}, "C": {"g": "x", "a": 4}}
    assert applied(sink.apply([change(MONEY, k, SEQ, s) for k, s in items.items()]))
    rebuild_once(sink, 0, 1, items)  # R0, while R2 is stuck between its read and its begin
    assert c.get("sum:x") == b"7"
    rebuild_once(sink, 0, 2, items)  # R2: floor 0 read before R0 raised
    assert c.get("sum:x") == b"7"


def test_an_x_mark_kept_from_a_rebuild_that_crashed_long_ago_blocks_the_repair_of_a_later_one(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild repairs a counter changed or deleted outside viewkeeper; the only
    ones left live are those a record read *before that rebuild began* moved meanwhile
    (README.md, "Through a rebuild").

    R1 begins (floor 0), raises to 1, re-reads A ('^' set) while a reader that had not yet
    acknowledged generation 1 applies a late page: Y 2 -> 4 at generation 0, which moves
    sum:y -> 'x' in the sums. R1 is killed. Weeks of ordinary stream traffic at generation
    1 follow (every late reader long gone). sum:y is then overwritten outside viewkeeper
    (999) and the operator rebuilds (R2: floor 1, raise 2): the sums are kept ('^') with
    R1's 'x' on sum:y, whose sum stays 'x' whatever R2 re-reads; R2's sweep leaves sum:y
    at 999 although Y yields 4. The late page was read long before R2 began."""
    c = redis_client
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", SEQ, {"g": "x", "a": 3}),
                change(MONEY, "Y", SEQ, {"g": "y", "a": 2}),
            ]
        )
    )
    sink.begin_rebuild(MONEY, 0)  # R1: raise -> 1
    assert applied(sink.apply([change(MONEY, "A", 0, {"g": "x", "a": 3}, gen=1)]))
    assert applied(sink.apply([change(MONEY, "Y", SEQ + 1, {"g": "y", "a": 4}, gen=0)]))
    # R1 killed here. Ordinary traffic at generation 1.
    for s in range(2, 6):
        assert applied(sink.apply([change(MONEY, "A", SEQ + s, {"g": "x", "a": s}, gen=1)]))
    c.set("sum:y", 999)  # outside viewkeeper
    rebuild_once(sink, 1, 2, {"A": {"g": "x", "a": 5}, "Y": {"g": "y", "a": 4}})  # R2
    assert c.get("sum:x") == b"5"
    assert c.get("sum:y") == b"4"


def test_the_first_rebuild_to_end_drops_the_sums_of_one_that_began_while_it_settled(
    sink: RedisSink, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guarantee: a rebuild repairs a counter changed or deleted outside viewkeeper before
    that rebuild began.

    R1 (floor 0, generation 1) re-reads A and settles sum:x (3). Before R1 drops its sums
    (_close_sums, after its last settling slice), sum:x is overwritten outside viewkeeper
    (999) and the operator, seeing it, starts R2 (floor 1): begin_rebuild keeps R1's sums
    ('^') as R2's. R1's _close_sums finds the same floor and deletes the field and the sums:
    R2's. R2 raises to 2, re-reads A (not counted: no rebuild runs, as far as the script
    knows), sweeps: its settling step finds no floor ("settled by another rebuild") and
    settles nothing. sum:x stays 999 although A yields 3; R2 reported success."""
    c = redis_client
    assert applied(sink.apply([change(MONEY, "A", SEQ, {"g": "x", "a": 3})]))
    close = sink._close_sums

    def close_late(ns: bytes, sums: bytes, floor: bytes) -> None:
        c.set("sum:x", 999)  # outside viewkeeper, after R1 settled sum:x
        sink.begin_rebuild(MONEY, 1)  # R2 begins: keeps the sums
        close(ns, sums, floor)

    monkeypatch.setattr(sink, "_close_sums", close_late)
    rebuild_once(sink, 0, 1, {"A": {"g": "x", "a": 3}})  # R1
    monkeypatch.setattr(sink, "_close_sums", close)
    assert applied(sink.apply([change(MONEY, "A", 0, {"g": "x", "a": 3}, gen=2)]))  # R2
    sink.sweep(MONEY, 2, 0)
    assert c.get("sum:x") == b"3"


def test_an_older_rebuilds_scan_page_read_after_a_later_rebuild_began_blocks_its_repair(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild repairs a counter changed or deleted outside viewkeeper; the only
    ones left live are those a record read *before that rebuild began* moved meanwhile.

    R0 and R1 both read floor 0 (begun together): R0 raises to 1, R1 to 2. R0 scans A and
    B at (1, 0), sweeps, settles and drops the sums. sum:y is overwritten outside
    viewkeeper (999); the operator runs R3, which reads floor 2 and raises to 3. R1, still
    scanning, now reads B (changed in the table: 2 -> 6) and applies it at (2, 0): a
    generation at R3's floor, so it counts as a late page, 'x' on sum:y — although the
    page was read after R3 began. R3 re-reads A and B at (3, 0) and sweeps: sum:y, 'x', is
    left live at 999 - 2 + 6 = 1003 instead of B's 6."""
    c = redis_client
    a, b = {"g": "x", "a": 3}, {"g": "y", "a": 2}
    assert applied(sink.apply([change(MONEY, "A", SEQ, a), change(MONEY, "B", SEQ, b)]))
    sink.begin_rebuild(MONEY, 0)  # R0 -> 1
    sink.begin_rebuild(MONEY, 0)  # R1 -> 2
    assert applied(sink.apply([change(MONEY, "A", 0, a, gen=1), change(MONEY, "B", 0, b, gen=1)]))
    assert applied(sink.apply([change(MONEY, "A", 0, a, gen=2)]))  # R1's scan, first page
    sink.sweep(MONEY, 1, 0)  # R0 ends: settles and drops the sums
    assert c.get("sum:y") == b"2"
    c.set("sum:y", 999)  # outside viewkeeper
    sink.begin_rebuild(MONEY, 2)  # R3: floor 2, raise -> 3
    b6 = {"g": "y", "a": 6}
    assert applied(sink.apply([change(MONEY, "B", 0, b6, gen=2)]))  # R1's second page
    sink.sweep(MONEY, 2, 0)  # R1 ends: the sums are R3's, it leaves them
    assert applied(sink.apply([change(MONEY, "A", 0, a, gen=3), change(MONEY, "B", 0, b6, gen=3)]))
    sink.sweep(MONEY, 3, 0)  # R3 ends
    assert c.get("sum:x") == b"3"
    assert c.get("sum:y") == b"6"
