"""Views of the end-to-end tests (table ``e2e-orders``)."""

import os

from viewkeeper import HashField, SetMember, SortedSetMember, Value, opensearch_view, redis_view

TABLE = "e2e-orders"


@redis_view(table=TABLE, redis="cache")
def order_card(order):  # type: ignore[no-untyped-def]
    if order.get("status") == "boom" and os.environ.get("VK_TEST_BOOM") == "1":
        raise RuntimeError("this order cannot be shown")
    yield Value(f"order:{order['order_id']}", {"status": order["status"], "total": order["total"]})
    yield SortedSetMember(
        f"customer:{order['customer_id']}:orders",
        member=order["order_id"],
        score=order["created_at"],
    )
    yield HashField(f"customer:{order['customer_id']}:totals", order["order_id"], order["total"])


@redis_view(table=TABLE, redis="cache")
def by_status(order):  # type: ignore[no-untyped-def]
    return SetMember(f"status:{order['status']}", order["order_id"])


@opensearch_view(table=TABLE, opensearch="search", index="orders")
def order_doc(order):  # type: ignore[no-untyped-def]
    if order.get("status") == "hidden":
        return None
    return {
        "customer_id": order["customer_id"],
        "status": order["status"],
        "total": float(order["total"]),
    }
