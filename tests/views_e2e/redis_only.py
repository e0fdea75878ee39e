"""A Redis-only view of ``e2e-orders`` (operations and Lambda tests)."""

import os

from viewkeeper import Value, redis_view


@redis_view(table="e2e-orders", redis="cache")
def card(order):  # type: ignore[no-untyped-def]
    if order.get("status") == "boom" and os.environ.get("VK_TEST_BOOM") == "1":
        raise RuntimeError("this order cannot be shown")
    yield Value(f"order:{order['order_id']}", {"status": order["status"], "total": order["total"]})
