"""Views of the Redis Cluster end-to-end tests (table ``cluster-items``: hash key ``pk`` S,
range key ``sk`` N, the chaos workload's schema: tests/chaos/workload.py writes it).

Every item that has a ``status`` owns entries on all three masters of the test bed's cluster
(3 masters, slots 0-5460, 5461-10922, 10923-16383 at start): ``{a}`` hashes to slot 15495,
``{b}`` to 3300, ``{c}`` to 7365, one per master, and the other keys spread over the slots.
Keys with a hash tag (``{user:ana}:cart``: every owner's cart in one slot of its own), with
braces that are no tag (``a}paid{c``: a ``}`` before the ``{``, so the whole key is hashed;
``{}st:paid``: an empty tag, the whole key again), and plain keys (``cl:card:k0:1``).
Ordinary updates move entries between keys (the owner moves the cart's field and the owner
set's member, the status moves the status sets' members, "shipped" drops the sorted-set
member), deletes retract everything.
"""

from viewkeeper import HashField, SetMember, SortedSetMember, Value, redis_view

TABLE = "cluster-items"
SPREAD_TAGS = ("{a}", "{b}", "{c}")  # slots 15495, 3300, 7365: one per master at start


def _id(item):  # type: ignore[no-untyped-def]
    return f"{item['pk']}:{item['sk']}"


@redis_view(table=TABLE, redis="cache")
def cluster_card(item):  # type: ignore[no-untyped-def]
    if "status" not in item:  # moto's first INSERT of an upsert: key attributes only
        return
    key = _id(item)
    yield Value(
        f"cl:card:{key}",
        {
            "status": item["status"],
            "owner": item["owner"],
            "n": item["n"],
            "tags": sorted(item.get("tags") or ()),
        },
    )
    yield HashField(f"{{user:{item['owner']}}}:cart", key, item["status"])
    if item["status"] != "shipped":
        yield SortedSetMember("{a}:by-n", member=key, score=item["n"])
    yield Value(f"{{b}}:n:{key}", item["n"])
    yield SetMember(f"{{c}}:owner:{item['owner']}", key)


@redis_view(table=TABLE, redis="cache")
def cluster_status(item):  # type: ignore[no-untyped-def]
    if "status" not in item:
        return None
    key = _id(item)
    return [
        SetMember(f"a}}{item['status']}{{c", key),
        SetMember(f"{{}}st:{item['status']}", key),
    ]
