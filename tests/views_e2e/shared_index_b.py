"""Deployment B of the one-namespace-one-source tests: table ``ns-orders-b``, index ``shared``
(the same index name as deployment A's, on the same OpenSearch node)."""

from viewkeeper import opensearch_view


@opensearch_view(table="ns-orders-b", opensearch="search", index="shared")
def shared_docs(item):  # type: ignore[no-untyped-def]
    return {"from": "b", "n": item["n"]}
