"""What a view can own: the entry types a projection function returns.

Each entry has an identity (``ident``) — what it *is*, used to diff an item's old entries
against its new ones — and a payload — what it *holds*, written on every apply. Two items
that yield entries with the same identity collide (a view bug, reported by the sink).

Values: ``str`` and ``bytes`` are stored verbatim; anything else is JSON (Decimal as a JSON
number, sets as sorted lists, bytes inside structures as base64).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = [
    "MAX_TTL",
    "Counter",
    "Document",
    "Entry",
    "HashField",
    "RedisEntry",
    "SetMember",
    "SortedSetCounter",
    "SortedSetMember",
    "Value",
]

MAX_TTL = 100 * 365 * 24 * 3600
"""The largest ``ttl`` of a Value or a redis_view: 100 years (of 365 days) in seconds,
3153600000. Every Redis takes it. Redis refuses an expiry whose milliseconds, added to the
current time, overflow a 64-bit integer (about 9.2e15 seconds), and that refusal came
inside the apply script, after the change's first writes (redis_apply.lua checks it too)."""


def _check_key(kind: str, key: object) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(
            f"{kind} key must be a non-empty str, got {key!r}; build it with an f-string"
        )
    return key


def ttl_problem(ttl: object) -> str | None:
    """Why ``ttl`` is not a valid expiry (None when it is): an int (not a bool) of seconds
    from 1 to :data:`MAX_TTL`, or None for no expiry."""
    if ttl is None or (isinstance(ttl, int) and not isinstance(ttl, bool) and 1 <= ttl <= MAX_TTL):
        return None
    return (
        f"ttl {ttl!r} is not a whole number of seconds from 1 to {MAX_TTL} (100 years); "
        "give an int in that range, or None for no expiry"
    )


def _check_ttl(key: str, ttl: object) -> int | None:
    problem = ttl_problem(ttl)
    if problem is not None:
        raise ValueError(f"Value {key!r}: {problem}")
    assert ttl is None or isinstance(ttl, int)
    return ttl


@dataclass(frozen=True, slots=True)
class Value:
    """A Redis string key holding ``value`` (``SET key value [EX ttl]``)."""

    key: str
    value: Any
    ttl: int | None = None

    def __post_init__(self) -> None:
        _check_key("Value", self.key)
        object.__setattr__(self, "ttl", _check_ttl(self.key, self.ttl))

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("V", self.key, "")


@dataclass(frozen=True, slots=True)
class HashField:
    """One field of a Redis hash (``HSET key field value``)."""

    key: str
    field: str
    value: Any

    def __post_init__(self) -> None:
        _check_key("HashField", self.key)
        if not isinstance(self.field, str):
            raise TypeError(f"HashField field must be a str, got {self.field!r}")

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("H", self.key, self.field)


@dataclass(frozen=True, slots=True)
class SetMember:
    """One member of a Redis set (``SADD key member``)."""

    key: str
    member: Any

    def __post_init__(self) -> None:
        _check_key("SetMember", self.key)

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("S", self.key, member_text(self.member))


@dataclass(frozen=True, slots=True)
class SortedSetMember:
    """One member of a Redis sorted set with its score (``ZADD key score member``)."""

    key: str
    member: Any
    score: int | float | Decimal

    def __post_init__(self) -> None:
        _check_key("SortedSetMember", self.key)
        if isinstance(self.score, bool) or not isinstance(self.score, int | float | Decimal):
            raise TypeError(
                f"SortedSetMember score must be a number, got {self.score!r} "
                f"for member {self.member!r} of {self.key!r}"
            )

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("Z", self.key, member_text(self.member))


INT64_MAX = 2**63 - 1
"""The largest sum a Counter holds (Redis' integers are signed 64-bit); the smallest is
``-INT64_MAX - 1``."""
SCORE_MAX = 2**53
"""The largest magnitude of a SortedSetCounter's amount and sum: a sorted-set score is a
double, exact for integers up to 2**53."""


def amount_range(sorted_set: bool) -> tuple[int, int]:
    """The lowest and highest amount, and sum, of a SortedSetCounter (``sorted_set``) or a
    Counter."""
    return (-SCORE_MAX, SCORE_MAX) if sorted_set else (-INT64_MAX - 1, INT64_MAX)


def _amount(kind: str, key: str, amount: object) -> int:
    """``amount`` as an int: an int (not a bool) or an integral Decimal within
    :func:`amount_range`; anything else is refused here, where the view builds the entry."""
    sorted_set = kind == "SortedSetCounter"
    lowest, limit = amount_range(sorted_set)
    if isinstance(amount, Decimal) and amount.is_finite() and amount == amount.to_integral_value():
        amount = int(amount)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(
            f"{kind} {key!r}: amount {amount!r} is not an integer; counters sum exactly, so "
            "amounts are int or integral Decimal: count money in integer cents "
            "(e.g. int(order['total'] * 100))"
        )
    if not lowest <= amount <= limit:
        raise ValueError(
            f"{kind} {key!r}: amount {amount} is outside {lowest}..{limit}"
            + (
                " (a sorted-set score is a double, exact up to 2**53)"
                if sorted_set
                else " (a Redis integer is signed 64-bit)"
            )
            + "; use a smaller unit or split the sum"
        )
    return amount


@dataclass(frozen=True, slots=True)
class Counter:
    """An exact sum kept by the view: the Redis integer at ``key`` (or at hash field
    ``field`` of ``key``) is the sum of ``amount`` over the view's items that currently
    yield this counter; absent when no item does. ``amount``: an int or integral Decimal,
    signed 64-bit."""

    key: str
    amount: int = 1
    field: str | None = None

    def __post_init__(self) -> None:
        _check_key("Counter", self.key)
        if self.field is not None and not isinstance(self.field, str):
            raise TypeError(
                f"Counter {self.key!r}: field must be a str or None, got {self.field!r}"
            )
        object.__setattr__(self, "amount", _amount("Counter", self.key, self.amount))

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("V", self.key, "") if self.field is None else ("H", self.key, self.field)


@dataclass(frozen=True, slots=True)
class SortedSetCounter:
    """An exact sum kept as a sorted-set score: ``member``'s score in ``key`` is the sum of
    ``amount`` over the view's items that currently yield this counter; the member is absent
    when no item does. ``amount``: an int or integral Decimal within +/-2**53."""

    key: str
    member: Any
    amount: int = 1

    def __post_init__(self) -> None:
        _check_key("SortedSetCounter", self.key)
        member_text(self.member)  # refused here rather than in the sink
        object.__setattr__(
            self,
            "amount",
            _amount("SortedSetCounter", self.key, self.amount),
        )

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("Z", self.key, member_text(self.member))


@dataclass(frozen=True, slots=True)
class Document:
    """The one OpenSearch document an item owns in an ``opensearch_view``."""

    doc_id: str
    body: dict[str, Any]

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("D", self.doc_id, "")


def member_text(member: Any) -> str:
    """Set and sorted-set members are strings in Redis: str as is, numbers in decimal form."""
    if isinstance(member, str):
        return member
    if isinstance(member, bool):
        return "true" if member else "false"
    if isinstance(member, int | Decimal):
        return str(member)
    if isinstance(member, bytes):
        return member.decode("utf-8", "surrogateescape")
    raise TypeError(f"set member {member!r} must be a str, int, Decimal or bytes")


RedisEntry = Value | HashField | SetMember | SortedSetMember | Counter | SortedSetCounter
Entry = RedisEntry | Document
