"""Rebuild tests, projection version 2: the same view names, keys moved."""

from viewkeeper import SortedSetMember, Value, opensearch_view, redis_view


@redis_view(table="rb-items", redis="cache")
def card(item):  # type: ignore[no-untyped-def]
    yield Value(f"v2:item:{item['pk']}", {"group": item["group"]})
    yield SortedSetMember(f"v2:group:{item['group']}", member=item["pk"], score=item["n"])


@opensearch_view(table="rb-items", opensearch="search", index="items")
def doc(item):  # type: ignore[no-untyped-def]
    return {"group": item["group"], "n": item["n"], "v": 2}
