"""Second attack round on aggregate views (Counter, SortedSetCounter): the rebuild's own sums
("shadow" sums, ``vk:{view}:sums``, begun by ``begin_rebuild`` and settled at the end of the
sweep) and the fixes of the first round, against the real redis-server. Each test is one way
found to break the contract (README.md, "Aggregate views"; viewkeeper/sinks/redis/README.md,
"Counters"): a counter equals the sum of amount over the view's items that currently yield
it; a rebuild while the stream flows leaves every counter equal to the sum over the table's
current items and repairs counters changed or deleted outside viewkeeper. Each fails on the
code it was written against.

The interleavings are driven through the sink's own methods, in the order ``rebuild()``
(runtime/rebuild.py) calls them: ``begin_rebuild(view, floor)`` with the generation read
before it raises it, the scan's changes at ``(G, 0)``, ``sweep(view, G, ...)``; stream
records are changes stamped with the generation their reader held."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from tests.counter_support import INT64_MAX, MONEY, SEQ, applied, change, sink  # noqa: F401

# ruff: noqa: F811 - the tests take the fixture `sink` imported above
from tests.helpers import write_config
from viewkeeper.sinks.base import Outcome
from viewkeeper.sinks.redis import RedisSink


def test_an_old_generation_record_applied_after_the_sweep_listed_items_is_counted_twice_negative(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild while the stream flows leaves every counter equal to the sum over
    the table's current items; nothing is counted twice (or retracted twice).

    A (3) and C (4) count into sum:x (7). Before the rebuild's handshake a worker read a page
    stamped generation 0 holding "X created with 5" (X is deleted from the table again right
    after, before the scan); its apply is late (a sink outage retried, worker.py: "the page
    is applied at those generations however late it is applied"). The rebuild (floor 0,
    generation 1) re-reads A and C; its sweep lists the owner records (X has none yet); the
    late page lands (sum:x = 12, X's record at (0, s)); the settling step sets sum:x to the
    rebuild's sums, 7, which do not count X (its generation is not above the floor) while X's
    owner record still holds its 5. Then X's REMOVE arrives: it retracts 5 from the settled
    7 -> 2, for good. Without the settling step the sum would be 12 then 7."""
    c = redis_client
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3}),
                change(MONEY, "C", SEQ + 1, {"g": "x", "a": 4}),
            ]
        )
    )
    sink.begin_rebuild(MONEY, 0)  # rebuild(): before raising the generation to 1
    scan = [
        change(MONEY, "A", 0, {"g": "x", "a": 3}, gen=1),
        change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=1),
    ]
    assert applied(sink.apply(scan))

    finish = sink._finish_sums

    def late_page_then_finish(*args: Any, **kwargs: Any) -> int:
        # the worker's page, read (stamped 0) before the handshake, lands now
        assert applied(sink.apply([change(MONEY, "X", SEQ + 5, {"g": "x", "a": 5})]))
        return finish(*args, **kwargs)

    sink._finish_sums = late_page_then_finish  # type: ignore[method-assign]
    sink.sweep(MONEY, 1, 0)
    # X's REMOVE: the next page (stamped 0 or 1 alike)
    assert applied(sink.apply([change(MONEY, "X", SEQ + 6, None, gen=1)]))
    assert c.get("sum:x") == b"7"


def test_a_second_rebuild_beginning_with_the_same_floor_wipes_the_running_rebuilds_sums(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild while the stream flows leaves every counter equal to the sum over
    the table's current items (A 3 + C 4 = 7).

    Two rebuilds of the view overlap (an operator's `viewkeeper rebuild --all` and the
    daemon's on_sink_loss rebuild, say). R2 reads the generations (money = 0), then is slow
    to reach this view's begin_rebuild (another sink's begin_rebuild retried through an
    outage, a stalled host). Meanwhile R1 begins (floor 0), raises to 1 and re-reads A and C
    at (1, 0): the sums hash counts them. R2's begin_rebuild(money, 0) now DELetes the sums
    and sets the same floor; R2 raises to 2 and re-reads A and C at (2, 0): their bodies did
    not change and their old records are above the floor, so nothing is added back. Each
    rebuild's settling step (same floor: both are "open") sets sum:x to the sums hash, which
    holds nothing for it: sum:x is DELETED although A and C both yield it (sums.py
    begin_rebuild deletes the sums whatever floor they were kept for)."""
    c = redis_client
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3}),
                change(MONEY, "C", SEQ + 1, {"g": "x", "a": 4}),
            ]
        )
    )
    floors_r2 = 0  # R2: store.generations(), before R1 raises
    sink.begin_rebuild(MONEY, 0)  # R1, then raise_generation -> 1
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", 0, {"g": "x", "a": 3}, gen=1),
                change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=1),
            ]
        )
    )
    sink.begin_rebuild(MONEY, floors_r2)  # R2, late; then raise_generation -> 2
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", 0, {"g": "x", "a": 3}, gen=2),
                change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=2),
            ]
        )
    )
    sink.sweep(MONEY, 1, 0)  # R1 ends first
    sink.sweep(MONEY, 2, 0)  # then R2
    assert c.get("sum:x") == b"7"


def test_a_counter_changed_outside_to_a_large_integer_is_repaired_once_deleted(
    sink: RedisSink, redis_client: Any
) -> None:
    """Guarantee: a rebuild repairs counters changed outside viewkeeper; an overflow is an
    ERROR only when the sum over the items is out of range.

    A (3) and C (4) count into sum:x; someone changes sum:x outside viewkeeper to a large
    integer (a stray INCRBY: 2**63 - 10). A's amount then becomes 20 in the table: its record
    is refused as an overflow (7 is the true sum: "count in a larger unit" is wrong advice)
    and dead-lettered. The rebuild meant to repair it re-reads A with 20: the live path adds
    17 to the foreign value, overflows, refuses A again (failed item, kept), and with a kept
    item the rebuild's sums are not settled: sum:x stays 2**63 - 10, the rebuild reports A
    failed, and every rebuild after ends the same way (its advice, "rebuild again once they
    can", never comes true: the live path refuses A as long as the foreign value is there,
    and only the settling step, skipped because of A, would remove it)."""
    c = redis_client
    assert applied(
        sink.apply(
            [
                change(MONEY, "A", SEQ + 1, {"g": "x", "a": 3}),
                change(MONEY, "C", SEQ + 1, {"g": "x", "a": 4}),
            ]
        )
    )
    c.set("sum:x", INT64_MAX - 9)
    [r] = sink.apply([change(MONEY, "A", SEQ + 2, {"g": "x", "a": 20})])
    assert r.outcome is Outcome.ERROR  # dead-lettered: the operator rebuilds
    sink.begin_rebuild(MONEY, 0)
    results = sink.apply(
        [
            change(MONEY, "A", 0, {"g": "x", "a": 20}, gen=1),
            change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=1),
        ]
    )
    keep = {k for k, r in zip("AC", results, strict=True) if r.outcome is Outcome.ERROR}
    sink.sweep(MONEY, 1, 0, keep)
    # Chosen (third round): a live sum that cannot be computed always refuses the change,
    # loudly, naming the value and the way out (was: the second round's fix counted it
    # silently, leaving the sum to a rebuild that might never settle it). The way out the
    # message names: delete the counter, then rebuild — which repairs it.
    assert keep == {"A"} and "rebuild the view" in str(results[0].error)
    c.delete("sum:x")
    sink.begin_rebuild(MONEY, 1)
    results = sink.apply(
        [
            change(MONEY, "A", 0, {"g": "x", "a": 20}, gen=2),
            change(MONEY, "C", 0, {"g": "x", "a": 4}, gen=2),
        ]
    )
    assert applied(results)
    sink.sweep(MONEY, 2, 0)
    assert c.get("sum:x") == b"24"


def test_rebuild_reports_success_but_leaves_a_deleted_counter_absent_after_a_failed_rebuild(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    dynamodb_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guarantee: `viewkeeper rebuild VIEW` leaves every counter equal to the sum over the
    table's current items and repairs counters deleted outside viewkeeper (what the ERROR
    for a foreign value tells the operator to do).

    Through runtime/rebuild.py's rebuild() against moto and the real Redis: orders o1 (300)
    and o2 (400) of customer c1; customer:c1:spent is deleted outside viewkeeper and the
    operator runs R1. While R1 waits for its handshake, a second rebuild R2 of the view
    starts (the daemon's on_sink_loss rebuild, a second operator) and fails its handshake
    (HandshakeTimeout: "run the rebuild again") after its begin_rebuild and its raise. R1
    then scans, sweeps and prints its summary as a success, but its settling step skipped
    silently (the sums are R2's: "a rebuild that began after this one"): customer:c1:spent
    stays absent although o1 and o2 yield 700."""
    from viewkeeper.app import App
    from viewkeeper.runtime import rebuild as rb

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    table = "e2e-orders"
    make_table(dynamodb, table, hash_key="pk")
    for pk, cents in (("o1", 300), ("o2", 400)):
        item = {"pk": {"S": pk}, "status": {"S": "paid"}, "customer_id": {"S": "c1"}}
        item |= {"day": {"S": "d1"}, "total_cents": {"N": str(cents)}, "adjust": {"N": "0"}}
        dynamodb.put_item(TableName=table, Item=item)
    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.counter_views"],
    )
    app = App.from_file(str(config))
    views = [app.registry.get("order_stats")]
    settings = rb.RebuildSettings(lease_duration=0.05, handshake_timeout=1.0, segments=1)

    def run() -> Any:
        return rb.rebuild(
            views, app.registry, app.client, app.store, app.pipeline, settings, out=io.StringIO()
        )

    run()  # the view as the stream would have built it
    assert redis_client.get("customer:c1:spent") == b"700"
    redis_client.delete("customer:c1:spent")  # outside viewkeeper; then R1

    real = rb.handshake
    calls: list[str] = []

    def handshake(*args: Any, **kwargs: Any) -> None:
        calls.append("h")
        if len(calls) == 1:  # R1 waits for its handshake: R2 runs and fails its own
            with pytest.raises(rb.HandshakeTimeout):
                run()
        elif len(calls) == 2:
            raise rb.HandshakeTimeout("R2: a worker did not take up the new generation")
        real(*args, **kwargs)

    monkeypatch.setattr(rb, "handshake", handshake)
    report = run()  # R1
    assert not report.failed_items and not report.unswept
    assert redis_client.get("customer:c1:spent") == b"700"
