"""Aggregate views of the counters' end-to-end test (table ``e2e-orders``, hash key ``pk`` S).

Items: ``status``, ``customer_id``, ``day`` (S), ``total_cents`` and ``adjust`` (N, any sign,
0 included; DynamoDB numbers arrive as Decimal), ``lines`` (optional L of M ``{p: S, qty: N}``,
the same product possibly twice in one order).

``order_stats`` is the view of the feature's description: a count per status, a sum per
customer (a string key), a sum per day in a hash field, and a sorted set of customers by
spend. ``order_adjust`` adds counters whose amounts are often negative or 0 and may be large
(up to 2e17: the sum no longer fits 15 digits, the Lua script adds it digit by digit), a hash
field counter whose key and field both move (status, customer), and per-product counters and
sorted-set counters an item may yield more than once (its amounts then add up).

An item without ``status`` owns nothing: moto turns an upsert (update_item on a missing
key) into two INSERT records, the first with the key attributes only (ARCHITECTURE.md §
Test bed). The test writes no upserts, but owning nothing there is exact anyway.
"""

from viewkeeper import Counter, SortedSetCounter, redis_view

TABLE = "e2e-orders"


@redis_view(table=TABLE, redis="cache")
def order_stats(order):  # type: ignore[no-untyped-def]
    if "status" not in order:
        return
    yield Counter(f"orders:count:{order['status']}")  # amount=1
    yield Counter(f"customer:{order['customer_id']}:spent", amount=order["total_cents"])
    yield Counter(f"day:{order['day']}", field="revenue", amount=order["total_cents"])
    yield SortedSetCounter(
        "customers:by_spend", member=order["customer_id"], amount=order["total_cents"]
    )


@redis_view(table=TABLE, redis="cache")
def order_adjust(order):  # type: ignore[no-untyped-def]
    if "status" not in order:
        return
    yield Counter(f"adj:day:{order['day']}", amount=order["adjust"])
    yield Counter(
        f"adj:status:{order['status']}", field=order["customer_id"], amount=order["adjust"]
    )
    for line in order.get("lines") or ():
        yield Counter(f"adj:product:{line['p']}:sold", amount=line["qty"])
        yield SortedSetCounter(
            f"adj:day:{order['day']}:products", member=line["p"], amount=line["qty"]
        )
