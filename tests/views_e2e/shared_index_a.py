"""Deployment A of the one-namespace-one-source tests: table ``ns-orders-a``, index ``shared``."""

from viewkeeper import opensearch_view


@opensearch_view(table="ns-orders-a", opensearch="search", index="shared")
def shared_docs(item):  # type: ignore[no-untyped-def]
    return {"from": "a", "n": item["n"]}
