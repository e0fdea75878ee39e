"""The bytes: what the sink stores and what one script call sends. No I/O.

Owns the encodings of README.md, "Encodings" — ``L(n)``, ``S(x)``, packed versions, entry
identities, owner records (:class:`OwnerRecord`) — and the arguments of a change as
``redis_apply.lua`` takes them (:func:`_entry_args`, with the checks that reject a change
before anything is sent), one call's batch (:class:`_Batch`) and its RESP framing. The key
names are built by the sink's methods (they need its ``key_prefix``): README.md, "Key layout".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from redis.crc import key_slot

from viewkeeper.projection.entries import (
    Counter,
    HashField,
    SetMember,
    SortedSetCounter,
    SortedSetMember,
    Value,
    member_text,
    ttl_problem,
)
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.encoding import redis_value

Ident = tuple[str, str, str]

_M = 2147483629
_KIND = {
    "V": "string Value",
    "H": "hash HashField",
    "S": "set SetMember",
    "Z": "sorted-set SortedSetMember",
    "v": "string Counter",  # counters: lowercase, the identity of the entry type above
    "h": "hash Counter",
    "z": "sorted-set SortedSetCounter",
}
_REDIS_TYPE = {
    "V": "string",
    "H": "hash",
    "S": "set",
    "Z": "zset",
    "v": "string",
    "h": "hash",
    "z": "zset",
}


def _b(text: str) -> bytes:
    """Text as Redis bytes; ``surrogateescape`` round-trips bytes members (see member_text)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


_TAGS: tuple[bytes, ...] = ()


def tag_for_slot(slot: int) -> bytes:
    """The shortest decimal text that hashes to cluster slot ``slot`` (0-16383): ``{TAG}`` in
    a key puts it in that slot, whatever other braces the key holds. The table is built on
    first use and published whole (threads using it first at once each see it complete)."""
    global _TAGS
    table = _TAGS
    if not table:
        tags: dict[int, bytes] = {}
        i = 0
        while len(tags) < 16384:
            tag = b"%d" % i
            tags.setdefault(key_slot(tag), tag)
            i += 1
        table = _TAGS = tuple(tags[s] for s in range(16384))
    return table[slot]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _L(n: int) -> bytes:
    return bytes((n,)) if n < 253 else b"\xfd" + n.to_bytes(4, "big")


def _len_at(raw: bytes, p: int) -> tuple[int, int]:
    n = raw[p]
    return (n, p + 1) if n < 253 else (int.from_bytes(raw[p + 1 : p + 5], "big"), p + 5)


def pack_version(version: Version) -> bytes:
    """The stored form of a version; bytewise order equals version order."""
    return _packed_int(version.generation) + _packed_int(int(version.sequence))


def _packed_int(n: int) -> bytes:
    """``L(len) bytes``: ``n`` as a minimal big-endian integer, after its length."""
    b = n.to_bytes((n.bit_length() + 7) // 8)
    return bytes((len(b),)) + b


def unpack_version(raw: bytes) -> tuple[Version, int]:
    """The version at the start of an owner record, and where the rest of the record starts."""
    lg = raw[0]
    ls = raw[1 + lg]
    end = 2 + lg + ls
    return Version(int.from_bytes(raw[1 : 1 + lg]), str(int.from_bytes(raw[2 + lg : end]))), end


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """What the sink remembers about one item of one view."""

    item_key: str
    version: Version
    entries: tuple[Ident, ...]  # the entries' ``ident`` (see entries.py); counters: v, h, z
    deleted_at: int | None  # epoch seconds when this is a tombstone
    amounts: tuple[int | None, ...] = ()  # per entry: a counter's amount, None for others

    @property
    def tombstone(self) -> bool:
        return self.deleted_at is not None


def _parse_record(item: bytes, raw: bytes) -> OwnerRecord:
    version, p = unpack_version(raw)
    if raw[p : p + 1] == b"~":
        return OwnerRecord(_text(item), version, (), int(raw[p + 1 :]))

    def string() -> bytes:
        nonlocal p
        if raw[p] == 254:
            n, p = _len_at(raw, p + 1)
            pre = raw[p : p + n]
            n, p = _len_at(raw, p + n)
            p += n
            return pre + item + raw[p - n : p]
        n, p = _len_at(raw, p)
        p += n
        return raw[p - n : p]

    entries: list[Ident] = []
    amounts: list[int | None] = []
    while p < len(raw):
        t = chr(raw[p])
        p += 1
        key = string()
        entries.append((t, _text(key), "" if t in "Vv" else _text(string())))
        if t in "vhz":
            n, p = _len_at(raw, p)
            p += n
            amounts.append(int(raw[p - n : p]))
        else:
            amounts.append(None)
    return OwnerRecord(_text(item), version, tuple(entries), None, tuple(amounts))


class _Reject(Exception):
    """This change alone cannot be applied (reported as an ERROR result)."""


def _score(entry: SortedSetMember) -> bytes:
    """Score text Redis parses to the same double; checked here, since a ZADD failing inside
    the script would leave the change half-written."""
    s = entry.score
    try:
        f = float(s)
    except (OverflowError, ValueError):
        f = math.nan
    if math.isnan(f) or (
        math.isinf(f)
        and not isinstance(s, float)
        and not (isinstance(s, Decimal) and s.is_infinite())
    ):
        raise _Reject(
            f"score {s!r} of member {entry.member!r} in {entry.key!r} is not a "
            "number a Redis sorted set can hold (a finite double or +/-inf)"
        )
    return str(s).encode() if isinstance(s, int) else repr(f).encode()


def _entry_args(e: object, prefix: bytes = b"") -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(type, key, identity, a, b) of one entry, as the script takes them; ``prefix`` goes
    before the key (the connection's ``entry_prefix``)."""
    if isinstance(e, Value):
        k = prefix + _b(e.key)
        if e.ttl is None:
            return b"V", k, b"V" + k, redis_value(e.value), b""
        problem = ttl_problem(e.ttl)  # Value() checks it; an entry changed after that
        if problem is not None:
            raise _Reject(f"Value {e.key!r}: {problem}")
        return b"V", k, b"V" + k, redis_value(e.value), b"%d" % e.ttl
    if isinstance(e, HashField):
        k, f = prefix + _b(e.key), _b(e.field)
        return b"H", k, b"H" + _L(len(k)) + k + f, f, redis_value(e.value)
    if isinstance(e, Counter):
        k = prefix + _b(e.key)
        if e.field is None:
            return b"v", k, b"V" + k, b"", b"%d" % e.amount
        f = _b(e.field)
        return b"h", k, b"H" + _L(len(k)) + k + f, f, b"%d" % e.amount
    if isinstance(e, SortedSetCounter):
        k, m = prefix + _b(e.key), _b(member_text(e.member))
        return b"z", k, b"Z" + _L(len(k)) + k + m, m, b"%d" % e.amount
    if isinstance(e, SetMember | SortedSetMember):
        k, m = prefix + _b(e.key), _b(member_text(e.member))
        if isinstance(e, SetMember):
            return b"S", k, b"S" + _L(len(k)) + k + m, m, b""
        return b"Z", k, b"Z" + _L(len(k)) + k + m, m, _score(e)
    raise _Reject(
        f"{type(e).__name__} is not a Redis entry; a redis_view yields Value, "
        "HashField, SetMember, SortedSetMember, Counter or SortedSetCounter"
    )


def _part(j: int, entries: Entries) -> str:
    """What argument ``j`` of a change is (see RedisSink._args_for), for messages."""
    if j < 5:
        return ("owner key", "item key", "view id", "version", "entry count")[j]
    t, key, _, sub = entries[(j - 5) // 4]
    role = (j - 5) % 4
    what = ("type", "key", {"V": "value", "H": "field", "h": "field"}.get(t, "member"), "")[role]
    if role == 3:
        what = {"V": "ttl", "H": "value", "Z": "score"}.get(
            t, "amount" if t in "vhz" else "argument"
        )
    return f"{what} of {_describe(t, key, sub)}"


def _describe(t: str, key: bytes, sub: bytes) -> str:
    kind = _KIND[t].split()[1]
    what = {"H": "field", "h": "field", "S": "member", "Z": "member", "z": "member"}.get(t)
    return f"{kind} {_text(key)!r}" + (f" {what} {_text(sub)!r}" if what else "")


Entries = list[tuple[str, bytes, bytes, bytes]]  # per entry: type, key, identity, field/member


@dataclass(slots=True)
class _Batch:
    """Changes sent in one script call: their indexes in :meth:`RedisSink.apply`'s input,
    their entries (to explain a reply), each one's arguments (to resend it alone), and the
    claims the call checks: (view name, claim key, marker)."""

    indexes: list[int]
    entries: list[Entries]
    args: list[list[bytes]]
    reply: Any = None  # None until read; a redis error when the call failed as a whole
    checks: list[tuple[str, bytes, bytes]] = field(default_factory=list)


def _resp(args: list[bytes]) -> bytes:
    """One command in RESP (redis-py's general packer takes twice as long)."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in args])
