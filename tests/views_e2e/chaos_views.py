"""Views of the chaos suite (table ``chaos-items``: hash key ``pk`` S, range key ``sk`` N).

Chosen so that ordinary updates move entries between keys, which is where a lost, replayed
or reordered record shows: the owner moves the sorted-set member and the hash field, the
status moves the set member, "shipped" drops the sorted-set member, "hidden" retracts the
OpenSearch document (the function returns None), and deletes retract everything. A second
OpenSearch view has a custom ``doc_id`` built from the owner, so an owner change moves the
document to another id (the sink's owner-record path), and "shipped" retracts it.

An item without ``status`` owns nothing: moto turns an upsert (update_item on a missing
key) into two INSERT records, the first with the key attributes only (ARCHITECTURE.md §
Test bed); real DynamoDB sends one. Owning nothing for that first record is exact: the
second follows.
"""

from viewkeeper import HashField, SetMember, SortedSetMember, Value, opensearch_view, redis_view

TABLE = "chaos-items"


def _id(item):  # type: ignore[no-untyped-def]
    return f"{item['pk']}:{item['sk']}"


@redis_view(table=TABLE, redis="cache")
def chaos_card(item):  # type: ignore[no-untyped-def]
    if "status" not in item:
        return
    key = _id(item)
    yield Value(
        f"chaos:card:{key}",
        {
            "status": item["status"],
            "owner": item["owner"],
            "n": item["n"],
            "tags": sorted(item.get("tags") or ()),
        },
    )
    if item["status"] != "shipped":
        yield SortedSetMember(f"chaos:owner:{item['owner']}:by-n", member=key, score=item["n"])
    yield HashField(f"chaos:owner:{item['owner']}:status", key, item["status"])


@redis_view(table=TABLE, redis="cache")
def chaos_status(item):  # type: ignore[no-untyped-def]
    if "status" not in item:
        return None
    return SetMember(f"chaos:status:{item['status']}", _id(item))


@opensearch_view(table=TABLE, opensearch="search", index="chaos-items")
def chaos_doc(item):  # type: ignore[no-untyped-def]
    if item.get("status", "hidden") == "hidden":
        return None
    return {
        "owner": item["owner"],
        "status": item["status"],
        "n": item["n"],
        "tags": sorted(item.get("tags") or ()),
    }


def _owner_doc_id(item):  # type: ignore[no-untyped-def]
    return f"{item['owner']}.{item['pk']}.{item['sk']}"


@opensearch_view(table=TABLE, opensearch="search", index="chaos-by-owner", doc_id=_owner_doc_id)
def chaos_owner_doc(item):  # type: ignore[no-untyped-def]
    if item.get("status", "shipped") == "shipped":
        return None
    return {"item": _id(item), "status": item["status"], "n": item["n"]}
