"""Views that misbehave on purpose (table ``bad-items``, hash key ``pk``).

Used by tests/test_bad_input.py (through ``Pipeline.process`` and through the CLI) and by
tests/test_security.py. What each view does is chosen per item, so one batch can mix good
and bad records:

- ``item["redis"]`` selects what ``bad_card`` (a redis_view) gives back;
- ``item["search"]`` selects what ``bad_doc`` (an opensearch_view) gives back.

Both default to ``"ok"``: a well-formed entry built from the item. Every other mode is one
row of tests/BAD_INPUTS.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from viewkeeper import HashField, SetMember, SortedSetMember, Value, opensearch_view, redis_view

TABLE = "bad-items"


class Opaque:
    """An object JSON cannot encode (what a view returns when it forgets a conversion)."""

    def __repr__(self) -> str:
        return "<Opaque>"


def _card(item: dict[str, Any]) -> Iterator[Any]:
    pk = item["pk"]
    yield Value(f"card:{pk}", {"pk": pk, "v": item.get("v")})
    yield SetMember("cards", pk)


@redis_view(table=TABLE, redis="cache")
def bad_card(item: dict[str, Any]) -> Any:
    mode = item.get("redis", "ok")
    pk = item["pk"]
    if mode == "ok":
        return _card(item)
    if mode == "raise":
        raise ValueError(f"cannot make a card for {pk!r}")
    if mode == "object":
        return Value(f"card:{pk}", {"obj": Opaque()})
    if mode == "nan":
        return Value(f"card:{pk}", {"total": Decimal("NaN")})
    if mode == "float_nan":
        return Value(f"card:{pk}", {"ratio": float("nan")})
    if mode == "bigint":
        return Value(f"card:{pk}", {"n": item["n"]})
    if mode == "dict":
        return {f"card:{pk}": "a dict is not an entry"}
    if mode == "string":
        return f"card:{pk}"
    if mode == "empty_key":
        return Value("", pk)
    if mode == "prefix":
        return Value(f"vk:{pk}", "inside the bookkeeping prefix")
    if mode == "bad_score":
        return SortedSetMember("scores", pk, Decimal("NaN"))
    if mode == "big":
        return Value(f"card:{pk}", item["blob"])
    if mode == "hostile":  # keys and values straight from the item
        return [
            Value(item["key"], item["value"]),
            HashField(item["key"] + ":h", item["value"], item["value"]),
            SetMember(item["key"] + ":set", item["value"]),
            SortedSetMember(item["key"] + ":z", item["value"], 1),
        ]
    if mode == "none":
        return None
    raise AssertionError(f"unknown redis mode {mode!r}")


@opensearch_view(table=TABLE, opensearch="search", index="bad-docs")
def bad_doc(item: dict[str, Any]) -> Any:
    mode = item.get("search", "ok")
    pk = item["pk"]
    if mode == "ok":
        return {"pk": pk, "v": item.get("v")}
    if mode == "raise":
        raise KeyError("missing_attribute")
    if mode == "list":
        return [pk, item.get("v")]
    if mode == "object":
        return {"pk": pk, "obj": Opaque()}
    if mode == "nan":
        return {"pk": pk, "total": Decimal("NaN")}
    if mode == "float_nan":
        return {"pk": pk, "ratio": float("nan")}
    if mode == "bigint":
        return {"pk": pk, "n": item["n"]}
    if mode == "underscore":
        return {"_id": "mine", "pk": pk}
    if mode == "big":
        return {"pk": pk, "blob": item["blob"]}
    if mode == "keyword":  # `tag` is mapped as keyword by the test's index template
        return {"pk": pk, "tag": item["tag"]}
    if mode == "hostile":
        return {"pk": pk, "text": item["value"]}
    if mode == "none":
        return None
    raise AssertionError(f"unknown search mode {mode!r}")
