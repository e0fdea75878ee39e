"""Rebuild tests, projection version 1 (table ``rb-items``)."""

from viewkeeper import SortedSetMember, Value, opensearch_view, redis_view


@redis_view(table="rb-items", redis="cache")
def card(item):  # type: ignore[no-untyped-def]
    yield Value(f"item:{item['pk']}", {"group": item["group"], "n": item["n"]})
    yield SortedSetMember(f"group:{item['group']}", member=item["pk"], score=item["n"])


@opensearch_view(table="rb-items", opensearch="search", index="items")
def doc(item):  # type: ignore[no-untyped-def]
    return {"group": item["group"], "n": item["n"]}
