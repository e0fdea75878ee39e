"""The orders example of the README: a cache card, a per-customer index, live aggregates
(orders per status, spend per customer), a search document, and a change log of status
changes for other services."""

from viewkeeper import (
    Counter,
    SetMember,
    SortedSetCounter,
    SortedSetMember,
    Value,
    changelog_view,
    opensearch_view,
    redis_view,
)


@redis_view(table="orders", redis="cache")
def order_card(order):  # type: ignore[no-untyped-def]
    yield Value(f"order:{order['order_id']}", {"status": order["status"], "total": order["total"]})
    yield SortedSetMember(
        f"customer:{order['customer_id']}:orders",
        member=order["order_id"],
        score=order["created_at"],
    )


@redis_view(table="orders", redis="cache")
def orders_by_status(order):  # type: ignore[no-untyped-def]
    yield SetMember(f"orders:status:{order['status']}", order["order_id"])


@redis_view(table="orders", redis="cache")
def order_stats(order):  # type: ignore[no-untyped-def]
    cents = int(order["total"] * 100)  # sums are exact integers: money in cents
    yield Counter(f"orders:count:{order['status']}")
    yield Counter(f"customer:{order['customer_id']}:spent_cents", amount=cents)
    yield SortedSetCounter("customers:by_spend", member=order["customer_id"], amount=cents)


@opensearch_view(table="orders", opensearch="search", index="orders")
def order_doc(order):  # type: ignore[no-untyped-def]
    return {
        "customer_id": order["customer_id"],
        "status": order["status"],
        "total": float(order["total"]),
    }


@changelog_view(table="orders", redis="cache", stream="orders:events", maxlen=100_000)
def order_events(change):  # type: ignore[no-untyped-def]
    if change.event == "MODIFY" and change.old["status"] == change.new["status"]:
        return None  # nothing worth telling
    return {
        "order_id": change.keys["order_id"],
        "event": change.event,
        "status": (change.new or {}).get("status", ""),
    }
