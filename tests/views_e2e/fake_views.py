"""A view on the fake stream's table ``fk`` (worker, lineage and supervisor tests)."""

import os

from viewkeeper import SortedSetMember, Value, redis_view


@redis_view(table="fk", redis="cache")
def fk_card(item):  # type: ignore[no-untyped-def]
    if item.get("v") == -1 and os.environ.get("VK_TEST_BOOM") == "1":
        raise ValueError("v = -1 is not allowed")
    yield Value(f"fk:{item['pk']}", str(item["v"]))
    yield SortedSetMember(f"fkg:{item['g']}", member=item["pk"], score=item["v"])


def expected(contents: dict[str, dict]) -> dict[str, object]:  # type: ignore[type-arg]
    """The projection of the fake table's items, in the shape of tests.helpers.redis_view_keys."""
    out: dict[str, object] = {}
    for item in contents.values():
        out[f"fk:{item['pk']}"] = str(item["v"])
        group = out.setdefault(f"fkg:{item['g']}", {})
        assert isinstance(group, dict)
        group[item["pk"]] = float(item["v"])
    return out
