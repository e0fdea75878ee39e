"""The Redis sink: one Lua script call applies a batch of changes, each one atomically.

Key layout (public, read by checkers; ``vk:`` is ``key_prefix``, which views may not write)::

    vk:{view}:o:{bucket}  hash  owner records of a view: field = item key (UTF-8),
                                bucket = crc32(item key) % owner_buckets
    vk:c:{bucket}         hash  claims of the connection, shared by its views: field = entry
                                identity, value = view id + item key,
                                bucket = int(identity, big-endian) % 2147483629 % owner_buckets
    vk:{view}:ns          hash  the view's claim (runtime.namespaces): source, coordination,
                                deployment, marker, generation; n, its write counter (below);
                                lost, why a script erased its marker
    vk:views              hash  view name -> short id; "#<id>" -> name; "#" = last id given
    vk:meta               hash  owner_buckets (changing it would strand every owner record)

Every script call first checks the claim of each view it writes (its marker, see
:meth:`RedisSink.expect`) and writes nothing when one differs: a Redis that came back empty
(restarted without persistence, a replaced node, a FLUSHALL), or a namespace another process
re-armed or another deployment took over, is noticed by the first write after it, atomically
(:class:`~viewkeeper.sinks.base.NamespaceLost`).

A Redis that comes back *from an older state* keeps the marker but not the writes
acknowledged since: restarted from its last RDB snapshot (the default ``save`` policy) or
from an AOF written with ``appendfsync everysec``, or a replica promoted before it had every
write. So each claim also holds a write counter ``n``, which every call increments once (after
all claim checks, before its first change) and returns; the sink remembers the highest it
saw per view (under the expected marker) and sends it with each call. A claim whose counter
is below it went back in time: the script erases its marker (``lost`` says why) and answers
``{'L', i, 'back'}`` without writing any change, and the sink raises NamespaceLost. With the
marker gone the namespace looks to everyone as after an empty restart —
:meth:`~viewkeeper.runtime.namespaces.Namespaces.lost` re-arms it, reports SINK DATA LOST and
marks the view needs_rebuild; the other processes' next calls are refused ('L') and adopt the
new claim; ``viewkeeper check`` and the next start see it lost — so nothing more is needed. A
new marker starts the counter's check again (:meth:`RedisSink.expect`);
:meth:`RedisSink.write_claim` keeps ``n``. Several processes share the counter: each one's mark
trails the counter, so their calls never look like a rollback to each other. A process notices
a rollback that lost some of *its* writes at its next call — unless the counter was carried
past its mark first by processes that lost none (each call adds one), or it restarted
meanwhile (the marks are in memory only: a host that reboots Redis and viewkeeper together is
not noticed). One process noticing is enough: the erased marker stops every other one.

``L(n)`` is one byte when ``n < 253``, else byte 253 and four bytes big-endian.

- Entry identity: ``V key`` | ``H L(key) key field`` | ``S L(key) key member`` |
  ``Z L(key) key member``: unambiguous for any bytes, and the claim field as it is.
- Packed version: ``L(g) g L(s) s`` with ``g``, ``s`` the generation and the sequence number
  as minimal big-endian integers. Bytewise order is version order (generation, then the
  sequence as an integer), the same order as ``projection/versions.py``; a 28-digit sequence takes
  12 bytes instead of 28 — bookkeeping memory is the budget here (~100 bytes per item).
- Owner record: packed version, then per entry ``type S(key)`` plus ``S(field or member)``
  for H/S/Z; or, for a tombstone (an item owning nothing), ``~`` and the deletion time in
  epoch seconds. ``S(x)`` is ``L(len) x``, or byte 254 ``L(len) prefix L(len) suffix`` when
  ``x`` contains the item key (entry keys are usually built from it: store it once).
- Claim value: view id, then ``=`` plus the offset and length of the item key inside the
  identity (one byte each), or ``:`` plus the item key when it does not appear there.

Hashes stay listpack-encoded (compact) while they hold at most 128 fields of at most 64 bytes
(``hash-max-listpack-*``): size ``owner_buckets`` at about items / 50. Use a ``noeviction``
or ``volatile-*`` maxmemory policy: an evicted owner record cannot be rebuilt from Redis.
Standalone Redis only: the script computes the keys it touches (a retracted entry's key comes
from the stored owner record) instead of declaring them, which Redis Cluster would refuse.

Batches: :meth:`RedisSink.apply` sends its changes :data:`_SLICE` per ``EVALSHA``, fewer when
their bytes would pass ``client-query-buffer-limit`` (``redis_apply.lua`` loops over them,
each one checked and written as before) and encodes the next batch while Redis runs one. The
reply is one byte per change plus details for the rare ones (errors, collisions): per change,
the client pays neither a command nor a reply parse, which took two thirds of the sink's time
when it sent one script call per change (``bench/redis_pipeline.py``: 8.9 → 3.5 µs of client
CPU per record). A call Redis refuses as a whole (none is foreseen) is resent one change per
call; each of those checks the claims again (a claim refusal there is NamespaceLost too), and
an answer the client does not know is never read as applied (SinkError: the batch is held).

A change is all or nothing. Redis does not roll back a script that fails halfway, so nothing
may fail after a change's first write:

- Validation before any write: the script first reads and checks all it will need (step 3):
  the type of each key it writes and of each key it retracts from (an entry whose key now
  holds another type is gone already: left alone), the claims, and every argument (a ttl of
  1 to :data:`~viewkeeper.projection.entries.MAX_TTL` seconds, a score Redis parses, one
  type per key), which the client and the view API checked already. What it then writes
  (SET, HSET, SADD, ZADD, DEL, HDEL, SREM, ZREM on keys of the checked types, with checked
  arguments) cannot fail. A Redis error inside a change (none is foreseen, and any would come
  before its first write) fails that change alone.
- Shebang refusal: the script starts with ``#!lua`` (no flags: it may write), so Redis >= 7
  refuses a call whole, before it runs, while writes are refused (OOM under ``maxmemory``,
  a read-only replica after a failover, MISCONF, NOREPLICAS).
- Transient abort: where the shebang cannot be compiled (Redis < 7, fakeredis: the script is
  loaded without that line) Redis refuses the first write of a call in those states, and the
  script ends the whole call with that error rather than failing that change alone; the
  changes before it in the call were complete, and sent again they answer stale.
  Either way the sink retries, then raises SinkUnavailable: the batch is held, never
  dead-lettered for the server's state.
- Credentials and permissions are the server's state too: a call refused whole with NOAUTH,
  WRONGPASS or NOPERM (the user lost ``+evalsha``: an ACL file reloaded, a rotation half
  done) is retried, then SinkUnavailable — never resent change by change and dead-lettered.
  An ACL that refuses one of the keys a change touches (NOPERM inside the script) ends the
  whole call the same way. That refusal may come after the change's first write (ACLs
  cannot be checked before): the change is then half-written, but not reported — its owner
  record is written last and still holds the older version, so the retry, once the ACL is
  fixed, writes the whole change again (retracting an entry already gone is a no-op).
- Sizes: an argument over ``proto-max-bulk-len`` or a change over ``client-query-buffer-limit``
  (read at prepare with CONFIG GET; Redis' defaults, 512 MB and 1 GB, where CONFIG is
  refused) is an ERROR before anything is sent. Sent, Redis would close the connection
  with a protocol error, which the client cannot tell from a transient failure.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.retry import Retry
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from viewkeeper.projection.api import View
from viewkeeper.projection.entries import (
    MAX_TTL,
    HashField,
    SetMember,
    SortedSetMember,
    Value,
    member_text,
    ttl_problem,
)
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import (
    APPLIED,
    STALE,
    Change,
    Claim,
    Collision,
    NamespaceLost,
    Outcome,
    Owner,
    Result,
    SinkError,
    SinkUnavailable,
)
from viewkeeper.sinks.encoding import EncodeError, redis_value

__all__ = ["OwnerRecord", "RedisSink", "pack_version", "unpack_version"]

log = logging.getLogger("viewkeeper.sinks.redis")
T = TypeVar("T")
Ident = tuple[str, str, str]

_M = 2147483629
_KIND = {
    "V": "string Value",
    "H": "hash HashField",
    "S": "set SetMember",
    "Z": "sorted-set SortedSetMember",
}
# Error codes of a server that refuses commands for now (its state, not the command's):
# the batch is held and retried. The script ends a whole call with these (redis_apply.lua).
_TRANSIENT_CODES = frozenset(
    {
        "OOM",
        "READONLY",
        "MASTERDOWN",
        "BUSY",
        "LOADING",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "NOREPLICAS",
        "MISCONF",
        "NOPERM",  # an ACL that refuses a command or a key: the server's configuration
    }
)
_SHEBANG = b"#!lua\n"  # the apply script's first line (see RedisSink._load_apply_script)
_SLICE = 64  # changes per script call; the next batch is encoded while Redis runs one
# Redis' defaults, used when CONFIG GET is refused (often disabled on managed Redis): the
# largest argument (proto-max-bulk-len) and the query buffer (client-query-buffer-limit).
_MAX_BULK = 512 * 2**20
_MAX_QUERY = 2**30
_HEAD = 1024  # bytes of a call that are not its changes' arguments (EVALSHA sha ... ), at most


def _load(name: str) -> bytes:
    return resources.files("viewkeeper.sinks.redis").joinpath(name).read_bytes()


def _b(text: str) -> bytes:
    """Text as Redis bytes; ``surrogateescape`` round-trips bytes members (see member_text)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


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
    entries: tuple[Ident, ...]  # the entries' ``ident`` (see entries.py)
    deleted_at: int | None  # epoch seconds when this is a tombstone

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
    while p < len(raw):
        t = chr(raw[p])
        p += 1
        key = string()
        entries.append((t, _text(key), "" if t == "V" else _text(string())))
    return OwnerRecord(_text(item), version, tuple(entries), None)


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
    if isinstance(e, SetMember | SortedSetMember):
        k, m = prefix + _b(e.key), _b(member_text(e.member))
        if isinstance(e, SetMember):
            return b"S", k, b"S" + _L(len(k)) + k + m, m, b""
        return b"Z", k, b"Z" + _L(len(k)) + k + m, m, _score(e)
    raise _Reject(
        f"{type(e).__name__} is not a Redis entry; a redis_view yields Value, "
        "HashField, SetMember or SortedSetMember"
    )


def _part(j: int, entries: Entries) -> str:
    """What argument ``j`` of a change is (see RedisSink._args_for), for messages."""
    if j < 5:
        return ("owner key", "item key", "view id", "version", "entry count")[j]
    t, key, _, sub = entries[(j - 5) // 4]
    role = (j - 5) % 4
    what = ("type", "key", {"V": "value", "H": "field"}.get(t, "member"), "")[role]
    if role == 3:
        what = {"V": "ttl", "H": "value", "Z": "score"}.get(t, "argument")
    return f"{what} of {_describe(t, key, sub)}"


def _describe(t: str, key: bytes, sub: bytes) -> str:
    kind = _KIND[t].split()[1]
    what = {"H": "field", "S": "member", "Z": "member"}.get(t)
    return f"{kind} {_text(key)!r}" + (f" {what} {_text(sub)!r}" if what else "")


def _is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is the server's state, not the command's: the batch is held and
    retried, never dead-lettered. That includes refused credentials and permissions (NOAUTH,
    WRONGPASS, NOPERM): a whole call refused for them says nothing about its changes (a
    credential rotation, an ACL file reloaded), and they may come back."""
    if isinstance(
        exc,
        AuthenticationError  # NOAUTH, WRONGPASS
        | NoPermissionError  # NOPERM
        | redis.ConnectionError
        | redis.TimeoutError
        | OutOfMemoryError
        | ReadOnlyError
        | TryAgainError
        | ClusterDownError,  # and MasterDownError
    ):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # redis-py strips the code of the errors it has a class for (status_code keeps it)
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    return code in _TRANSIENT_CODES


def _cannot_compile_shebang(exc: redis.ResponseError) -> bool:
    """A compile error at the shebang: "... unexpected symbol near '#'" (Redis < 7, fakeredis)."""
    return "'#'" in str(exc) and not _is_transient(exc)


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


def _read(conn: Any, batch: _Batch | None) -> None:
    if batch is not None:
        try:
            batch.reply = conn.read_response()
        except redis.ResponseError as exc:  # this call's error, e.g. NOSCRIPT
            batch.reply = exc


def _again(reply: Any) -> bool:
    """Whether a reply means "send it again": none yet, NOSCRIPT or a transient error."""
    return (
        reply is None
        or isinstance(reply, NoScriptError)
        or (isinstance(reply, Exception) and _is_transient(reply))
    )


class RedisSink:
    """A ``redis:`` connection of the config, serving all its views (the ``Sink`` protocol)."""

    def __init__(
        self,
        name: str,
        client: redis.Redis | None = None,
        *,
        url: str | None = None,
        key_prefix: str = "vk:",
        entry_prefix: str = "",
        owner_buckets: int = 4096,
        tombstone_retention: float = 48 * 3600,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = 5.0,
        batch_size: int = 500,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError(f"redis sink {name!r}: give a client or a url")
            # Our own retry loop (tenacity, bounded) replaces redis-py's built-in retries.
            client = redis.Redis.from_url(
                url, socket_connect_timeout=2.0, socket_timeout=10.0, retry=Retry(NoBackoff(), 0)
            )
            self._owns_client = True
        else:
            self._owns_client = False
        kw = client.connection_pool.connection_kwargs
        if kw.get("decode_responses"):
            raise ValueError(
                f"redis sink {name!r}: the client must use decode_responses=False; "
                "owner records are binary"
            )
        if owner_buckets < 1 or not key_prefix:
            raise ValueError(
                f"redis sink {name!r}: owner_buckets must be >= 1 and key_prefix non-empty"
            )
        self.name = name
        self.where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self.key_prefix = key_prefix
        self.entry_prefix = entry_prefix
        self._entry_prefix = _b(entry_prefix)
        self.owner_buckets = owner_buckets
        self.tombstone_retention = tombstone_retention
        self.retry_seconds = retry_seconds
        self.batch_size = batch_size
        # Any: redis-py's annotations assume str replies; this client returns bytes.
        self._client: Any = client
        self._clock = clock
        self._secret = str(kw.get("password") or "")
        self._prefix = _b(key_prefix)
        self._claims = self._prefix + b"c:"
        self._nbuckets = b"%d" % owner_buckets
        self._registry = self._prefix + b"views"
        source = _load("redis_apply.lua")
        if not source.startswith(_SHEBANG):
            raise AssertionError("redis_apply.lua must start with " + repr(_SHEBANG))
        self._apply_legacy = source[len(_SHEBANG) :]  # the same script without the shebang
        self._apply_src, self._apply_sha = b"", b""
        self._set_apply_script(source)
        self._purge = client.register_script(_load("redis_purge.lua"))
        self._views = client.register_script(_load("redis_views.lua"))
        self._max_bulk, self._max_query = _MAX_BULK, _MAX_QUERY  # learnt in _ensure_ready
        self._view_ids: dict[str, bytes] = {}
        self._view_names: dict[bytes, str] = {}
        self._owner_prefix: dict[str, bytes] = {}
        self._generations: dict[int, bytes] = {}
        self._markers: dict[str, bytes] = {}  # view -> the marker its claim must hold
        # view -> the highest write counter seen in its claim under that marker (rollbacks)
        self._seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()
        self._ready = False

    @classmethod
    def from_url(cls, name: str, url: str, **options: Any) -> RedisSink:
        """A sink from ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS)."""
        return cls(name, url=url, **options)

    def __repr__(self) -> str:
        return f"RedisSink({self.name!r}, {self.where})"

    # -- the Sink protocol -----------------------------------------------------------------
    def prepare(self, views: Sequence[View]) -> None:
        """Load the scripts, check the bucket count and register the views' ids."""
        self._ensure_ready()
        for view in views:
            self._view_id(view.name)
        policy = self._with_retry(partial(self._config, "maxmemory-policy")) or ""
        if policy.startswith("allkeys-"):
            log.warning(
                "redis sink %s (%s): maxmemory-policy %s may evict owner records; use "
                "noeviction or volatile-*",
                self.name,
                self.where,
                policy,
            )

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        """One Result per change, in order; raises SinkUnavailable after ``retry_seconds``."""
        try:
            return self._apply(changes, self._clock())
        except SinkUnavailable:
            self._ready = False  # check again before the retry: a restart, changed limits
            raise

    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        """Retract and tombstone items whose record is older than ``generation`` (rebuild),
        except those in ``keep``."""
        retracted, batch = 0, []
        for rec in self.iter_owner_records(view):
            if rec.version.generation < generation and rec.entries and rec.item_key not in keep:
                batch.append(Change(view, rec.item_key, Version(generation, "0"), []))
            if len(batch) >= self.batch_size:
                retracted += self._count_applied(self._apply(batch, now))
                batch = []
        return retracted + self._count_applied(self._apply(batch, now))

    def purge_tombstones(self, view: View | str, older_than: float | None = None) -> int:
        """Forget tombstones deleted before ``older_than`` (default: now - retention)."""
        cutoff = int(self._clock() - self.tombstone_retention if older_than is None else older_than)
        per_bucket: dict[bytes, list[bytes]] = {}
        for rec in self.iter_owner_records(view):
            if rec.deleted_at is not None and rec.deleted_at < cutoff:
                item = _b(rec.item_key)
                per_bucket.setdefault(self._owner_key(view, item), []).append(item)
        purged = 0
        for key, items in per_bucket.items():

            def purge(k: bytes = key, i: list[bytes] = items) -> int:
                return int(self._purge(keys=[k], args=[cutoff, *i]))

            purged += self._with_retry(purge)
        return purged

    def ping(self) -> None:
        self._with_retry(self._client.ping)

    # -- claims (runtime.namespaces) ---------------------------------------------------------------
    def _claim_key(self, view: View | str) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + _b(name) + b":ns"

    def read_claim(self, view: View) -> Claim | None:
        def read() -> Any:
            try:
                return self._client.hgetall(self._claim_key(view))
            except redis.ResponseError as exc:
                if "WRONGTYPE" in str(exc):
                    return None  # overwritten by something else: no claim (the script says 'L')
                raise

        raw = self._with_retry(read)
        if not raw or b"marker" not in raw:
            return None
        f = {k.decode(): _text(v) for k, v in raw.items()}
        owner = Owner(f.get("source", "?"), f.get("coordination", "?"), f.get("deployment", "?"))
        return Claim(owner, f["marker"], int(f.get("generation", "0") or 0))

    def write_claim(self, view: View, claim: Claim) -> None:
        key = self._claim_key(view)
        fields = {
            "source": claim.owner.source,
            "coordination": claim.owner.coordination,
            "deployment": claim.owner.deployment,
            "marker": claim.marker,
            "generation": str(claim.generation),
        }

        def write() -> None:
            # the write counter (n) stays: a claim written again under the same marker (a
            # rebuild's announce) must not look like a server that went back in time
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(key, "lost")
            pipe.hset(key, mapping=fields)
            try:
                pipe.execute()
            except redis.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                self._client.delete(key)  # not a hash: overwritten, no claim in it
                self._client.hset(key, mapping=fields)

        self._with_retry(write)

    def expect(self, view: View, marker: str | None) -> None:
        """From now on, each script call checks ``view``'s claim: its marker and its write
        counter (see the module doc); a new marker starts the counter's check again."""
        want = None if marker is None else _b(marker)
        with self._seen_lock:
            if self._markers.get(view.name) != want:
                self._seen.pop(view.name, None)
            if want is None:
                self._markers.pop(view.name, None)
            else:
                self._markers[view.name] = want

    def wipe(self, view: View) -> int:
        """Retract every entry the view's owner records own (at a version above any a
        deployment can have written), then delete its owner records."""
        top = Version(2**63, "0")
        changes = [
            Change(view, rec.item_key, top, [])
            for rec in self.iter_owner_records(view)
            if rec.entries
        ]
        retracted = 0
        for i in range(0, len(changes), self.batch_size):
            retracted += self._count_applied(
                self._apply(changes[i : i + self.batch_size], self._clock())
            )
        keys = [self._bucket_key(view, b) for b in range(self.owner_buckets)]
        for i in range(0, len(keys), 1000):
            part = keys[i : i + 1000]
            self._with_retry(lambda part=part: self._client.delete(*part))  # type: ignore[misc]
        return retracted

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- helpers for tests and checkers --------------------------------------------------------
    def owned_entries(self, view: View | str, item_key: str) -> list[Ident] | None:
        """The identities the item owns (``[]`` for a tombstone), or None without a record."""
        item = _b(item_key)
        raw = self._with_retry(lambda: self._client.hget(self._owner_key(view, item), item))
        return None if raw is None else list(_parse_record(item, raw).entries)

    def iter_owner_records(self, view: View | str) -> Iterator[OwnerRecord]:
        """Every owner record of the view (tombstones included), bucket by bucket."""
        step = 256
        for first in range(0, self.owner_buckets, step):
            keys = [
                self._bucket_key(view, b)
                for b in range(first, min(first + step, self.owner_buckets))
            ]

            def scan(keys: list[bytes] = keys) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.hscan(key, 0, count=1000)
                return list(pipe.execute())

            for key, (cursor, fields) in zip(keys, self._with_retry(scan), strict=True):
                if cursor:  # a bucket past listpack size: scan it to the end
                    fields = self._with_retry(partial(self._hscan_all, key))
                for item, raw in fields.items():
                    yield _parse_record(item, raw)

    # -- internals -------------------------------------------------------------------------
    def _bucket_key(self, view: View | str, bucket: int) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + _b(name) + b":o:%d" % bucket  # as _args_for builds it

    def _owner_key(self, view: View | str, item: bytes) -> bytes:
        return self._bucket_key(view, zlib.crc32(item) % self.owner_buckets)

    def _hscan_all(self, key: bytes) -> dict[bytes, bytes]:
        return dict(self._client.hscan_iter(key, count=1000))

    @staticmethod
    def _count_applied(results: list[Result]) -> int:
        return sum(r.outcome is Outcome.APPLIED for r in results)

    def _set_apply_script(self, source: bytes) -> None:
        self._apply_src = source
        self._apply_sha = hashlib.sha1(source).hexdigest().encode()  # what EVALSHA names

    def _use_legacy_script(self) -> None:
        """From now on, the apply script without its shebang line (Redis < 7, fakeredis)."""
        self._set_apply_script(self._apply_legacy)

    def _load_apply_script(self, probe: bool = False) -> None:
        """SCRIPT LOAD the apply script: at start, and after a restart or a SCRIPT FLUSH (the
        variant chosen before). The shebang makes Redis >= 7 refuse a call whole when writes
        are refused (redis_apply.lua). A server that cannot compile it gets the script without
        that line, from then on: Redis < 7 says so at SCRIPT LOAD, fakeredis only at the first
        call, hence ``probe``: a call with no change, which writes nothing."""
        try:
            self._client.script_load(self._apply_src)
            if probe and self._apply_src.startswith(_SHEBANG):
                self._client.evalsha(self._apply_sha, 0, b"0", self._claims, self._nbuckets, b"0")
        except redis.ResponseError as exc:
            if not self._apply_src.startswith(_SHEBANG) or not _cannot_compile_shebang(exc):
                raise
            log.info(
                "redis sink %s (%s) cannot compile a script shebang (Redis < 7?); its calls "
                "are not refused whole when writes are refused, but the script aborts a call "
                "at its first refused write",
                self.name,
                self.where,
            )
            self._use_legacy_script()
            self._client.script_load(self._apply_src)

    def _config(self, name: str) -> str | None:
        """``CONFIG GET name``, or None where CONFIG is refused (renamed or disabled, as on
        many managed Redis services)."""
        try:
            reply = self._client.config_get(name)
        except redis.ResponseError as exc:
            if _is_transient(exc):
                raise
            return None
        for key, value in reply.items():  # str or bytes, depending on the redis-py version
            if (key.decode() if isinstance(key, bytes) else key) == name:
                return value.decode() if isinstance(value, bytes) else str(value)
        return None

    def _learn_limits(self) -> None:
        """The largest argument and the largest query the server takes: a change over them is
        refused before it is sent. Sent anyway, Redis answers a protocol error and closes the
        connection, often while the client still sends: the client sees ECONNRESET, which
        looks transient, and would send the same call again and again."""
        bulk, query = self._config("proto-max-bulk-len"), self._config("client-query-buffer-limit")
        self._max_bulk = int(bulk) if bulk and bulk.isdigit() else _MAX_BULK
        self._max_query = int(query) if query and query.isdigit() else _MAX_QUERY

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        meta = self._prefix + b"meta"

        def check() -> Any:
            self._load_apply_script(probe=True)
            self._learn_limits()
            pipe = self._client.pipeline(transaction=False)
            pipe.hsetnx(meta, "owner_buckets", self.owner_buckets)
            pipe.hget(meta, "owner_buckets")
            return pipe.execute()[1]

        stored = self._with_retry(check)
        if int(stored) != self.owner_buckets:
            raise SinkError(
                f"redis sink {self.name!r} ({self.where}): owner_buckets is {self.owner_buckets} "
                f"but the data under {self.key_prefix!r} was written with {int(stored)}; set "
                f"owner_buckets: {int(stored)} (changing it needs an empty prefix and a rebuild)"
            )
        self._ready = True

    def _view_id(self, name: str) -> bytes:
        vid = self._view_ids.get(name)
        if vid is None:
            vid = bytes(self._with_retry(lambda: self._views(keys=[self._registry], args=[name])))
            self._view_ids[name], self._view_names[vid] = vid, name
        return vid

    def _view_name(self, vid: bytes) -> str:
        if vid not in self._view_names:
            raw = self._with_retry(lambda: self._client.hget(self._registry, b"#" + vid))
            self._view_names[vid] = _text(raw) if raw else f"#{_text(vid)}"
        return self._view_names[vid]

    def _apply(self, changes: Sequence[Change], now: float) -> list[Result]:
        """Send the changes in batches (see :meth:`_batches`) on one connection, one script
        call each, reading a batch's reply only after sending the next, so Redis runs one
        batch while we encode the next. Whatever did not get a reply (connection lost,
        NOSCRIPT, BUSY...) is sent again by :meth:`_resend`."""
        self._ensure_ready()
        results: list[Result | None] = [None] * len(changes)
        batches: list[_Batch] = []
        stamp = b"%d" % int(now)
        todo = self._batches(changes, results)
        try:
            with self._connection() as conn:
                waiting: _Batch | None = None
                for batch in todo:
                    batches.append(batch)
                    # a health check would read a pending reply
                    conn.send_packed_command(
                        [self._command(batch, stamp)], check_health=waiting is None
                    )
                    _read(conn, waiting)
                    waiting = batch
                _read(conn, waiting)
        except Exception as exc:
            if not _is_transient(exc):
                raise
        batches.extend(todo)  # the batches not sent yet
        if any(_again(b.reply) for b in batches):
            self._with_retry(partial(self._resend, batches, stamp))
        self._refuse_lost(batches)
        batches = self._split_refused(batches, stamp)
        self._refuse_lost(batches)  # a change resent alone checks the claims again
        self._learn_counters(batches)
        for b in batches:
            self._results(changes, b, results)
        out = [r for r in results if r is not None]
        if len(out) != len(changes):  # a batch lost on the way: never checkpoint past it
            raise AssertionError(f"{len(changes) - len(out)} changes got no result")
        return out

    def _batches(self, changes: Sequence[Change], results: list[Result | None]) -> Iterator[_Batch]:
        """The changes' arguments in batches of at most :data:`_SLICE` changes and at most
        ``client-query-buffer-limit`` bytes; a change Redis would refuse gets its ERROR in
        ``results`` instead (nothing of it is sent)."""
        batch, used, budget = _Batch([], [], []), 0, self._max_query - _HEAD
        for i, change in enumerate(changes):
            try:
                args, entries = self._args_for(change)
                size = self._size(args, entries)
            except (_Reject, EncodeError, TypeError, ValueError) as exc:
                results[i] = Result(Outcome.ERROR, self._where(change) + str(exc))
                continue
            if batch.indexes and (len(batch.indexes) == _SLICE or used + size > budget):
                yield batch
                batch, used = _Batch([], [], []), 0
            batch.indexes.append(i)
            batch.entries.append(entries)
            batch.args.append(args)
            self._check(batch, change.view.name)
            used += size
        if batch.indexes:
            yield batch

    def _check(self, batch: _Batch, view: str) -> None:
        """Make the call of ``batch`` check ``view``'s claim, when a marker is expected."""
        marker = self._markers.get(view)
        if marker is not None and not any(c[0] == view for c in batch.checks):
            batch.checks.append((view, self._claim_key(view), marker))

    def _size(self, args: list[bytes], entries: Entries) -> int:
        """The bytes one change adds to a call (RESP framing counted high); raises _Reject
        when an argument is over ``proto-max-bulk-len`` or the change over the query limit."""
        size = sum(map(len, args)) + 16 * len(args)
        if size > self._max_bulk:  # cheap test first: no argument is larger than the sum
            j = max(range(len(args)), key=lambda j: len(args[j]))
            if len(args[j]) > self._max_bulk:
                raise _Reject(
                    f"the {_part(j, entries)} is {len(args[j])} bytes, over the Redis "
                    f"server's bulk length limit (proto-max-bulk-len, {self._max_bulk} bytes): "
                    "nothing was sent; make it smaller in the view (e.g. store a reference to "
                    "the data), or raise proto-max-bulk-len on the server"
                )
        if size > self._max_query - _HEAD:
            raise _Reject(
                f"the change's {len(entries)} entries are {size} bytes in all, over the Redis "
                f"server's client-query-buffer-limit ({self._max_query} bytes) for one call: "
                "nothing was sent; make the item's entries fewer or smaller, or raise "
                "client-query-buffer-limit on the server"
            )
        return size

    def _command(self, batch: _Batch, stamp: bytes) -> bytes:
        head = [b"EVALSHA", self._apply_sha, b"0", stamp, self._claims, self._nbuckets]
        head.append(b"%d" % len(batch.checks))
        seen = self._seen
        for view, key, marker in batch.checks:
            head += (key, marker, b"%d" % seen.get(view, 0))
        return _resp(head + [a for change in batch.args for a in change])

    def _resend(self, batches: list[_Batch], stamp: bytes) -> None:
        for _ in range(3):
            todo = [b for b in batches if _again(b.reply)]
            if not todo:
                return
            if any(isinstance(b.reply, NoScriptError) for b in todo):
                self._load_apply_script()  # after a restart or SCRIPT FLUSH
            with self._connection() as conn:
                conn.send_packed_command([self._command(b, stamp) for b in todo])
                for b in todo:
                    _read(conn, b)
            for b in todo:
                if isinstance(b.reply, Exception) and _is_transient(b.reply):
                    raise b.reply
            # the changes before a transient failure inside the batch were applied: sent
            # again, they answer stale (as after a lost reply), the sink holds them either way
        raise redis.ConnectionError("NOSCRIPT right after SCRIPT LOAD: is a proxy in the way?")

    def _split_refused(self, batches: list[_Batch], stamp: bytes) -> list[_Batch]:
        """A call Redis refused as a whole (none is foreseen: arguments over the server's
        limits are not sent, see :meth:`_size`) is sent again one change per call, so that
        only the changes at fault fail. One call at a time, each reply read before the next
        is sent: Redis closes the connection after a protocol error, and the reset would
        lose the replies of the calls before it."""
        out: list[_Batch] = []
        for b in batches:
            if not isinstance(b.reply, Exception) or len(b.indexes) == 1:
                out.append(b)
                continue
            for i, e, a in zip(b.indexes, b.entries, b.args, strict=True):
                single = _Batch([i], [e], [a], checks=b.checks)
                self._with_retry(partial(self._resend, [single], stamp))
                out.append(single)
        return out

    def _refuse_lost(self, batches: list[_Batch]) -> None:
        """A call refused for a claim (``{'L', i}``: it does not hold its marker; ``{'L', i,
        'back'}``: its write counter went back, and the script erased its marker) wrote
        none of its changes (and the calls after it check the same claims): raise
        NamespaceLost for those views. The view ids and bookkeeping meta of a Redis that
        lost its data are gone too: learnt again."""
        lost: set[str] = set()
        back: set[str] = set()
        for b in batches:
            reply = b.reply
            if isinstance(reply, list) and reply and reply[0] == b"L":
                view = b.checks[int(reply[1]) - 1][0]
                lost.add(view)
                if len(reply) > 2 and reply[2] == b"back":
                    back.add(view)
        if not lost:
            return
        self._view_ids.clear()
        self._view_names.clear()
        self._ready = False
        for view in sorted(back):
            log.error(
                "redis sink %s (%s): view %s went back in time: its claim's write counter is "
                "below what this process saw (Redis restarted from an older RDB or AOF "
                "snapshot, or a replica that had not received every write was promoted); "
                "writes acknowledged since are lost. Its claim's marker is erased, so that "
                "every process sees the namespace as lost and the view is rebuilt",
                self.name,
                self.where,
                view,
            )
        why = "does not hold the expected marker"
        if back:
            why += f" (view(s) {', '.join(sorted(back))}: the server went back in time)"
        raise NamespaceLost(
            f"redis sink {self.name!r} ({self.where}): the claim of view(s) "
            f"{', '.join(sorted(lost))} {why}; nothing was written",
            sorted(lost),
        )

    def _learn_counters(self, batches: list[_Batch]) -> None:
        """Remember the highest write counter each view's claim answered (see the module
        doc): a later call that finds it lower knows the server went back in time."""
        seen = self._seen
        with self._seen_lock:
            for b in batches:
                reply = b.reply
                if not (isinstance(reply, list) and len(reply) > 1 and b.checks):
                    continue
                counters = reply[1]
                if not isinstance(counters, list) or len(counters) != len(b.checks):
                    raise self._unexpected(reply)
                for (view, _, marker), n in zip(b.checks, counters, strict=True):
                    # counters of another marker are not this one's (expect() reset it)
                    if self._markers.get(view) == marker and n > seen.get(view, 0):
                        seen[view] = n

    def _results(self, changes: Sequence[Change], b: _Batch, results: list[Result | None]) -> None:
        reply = b.reply
        if isinstance(reply, Exception):  # the call of this one change was refused
            for i in b.indexes:
                results[i] = self._rejected(changes[i], reply)
            return
        codes = reply[0] if isinstance(reply, list) and reply else None
        if not isinstance(codes, bytes) or len(codes) != len(b.indexes):
            raise self._unexpected(reply)
        details = iter(reply[2:])  # reply[1]: the claims' write counters
        for i, entries, code in zip(b.indexes, b.entries, codes, strict=True):
            if code == 49:  # b"1"
                results[i] = APPLIED
            elif code == 48:  # b"0"
                results[i] = STALE
            elif code == 101:  # b"e": a Redis error stopped this change
                results[i] = self._rejected(changes[i], next(details))
            elif code == 120:  # b"x": see _result
                results[i] = self._result(changes[i], entries, next(details))
            else:  # never read an answer this client does not know as applied
                raise self._unexpected(reply)

    def _unexpected(self, reply: Any) -> SinkError:
        return SinkError(
            f"redis sink {self.name!r} ({self.where}): the apply script answered "
            f"{self._scrub(repr(reply))[:200]}, which this client does not know; nothing is "
            "reported applied (is another version of redis_apply.lua loaded under its sha, "
            "or a proxy in the way?)"
        )

    def _rejected(self, change: Change, error: Exception | bytes) -> Result:
        text = _text(error) if isinstance(error, bytes) else str(error)
        return Result(
            Outcome.ERROR,
            self._where(change) + f"Redis rejected the change: {self._scrub(text)}",
        )

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            yield conn
        except BaseException:
            conn.disconnect()  # unread replies would be read as the next command's
            raise
        finally:
            pool.release(conn)

    @staticmethod
    def _where(change: Change) -> str:
        return f"view {change.view.name}, item {change.item_key!r}: "

    def _args_for(self, change: Change) -> tuple[list[bytes], Entries]:
        """The script's arguments for one change (see redis_apply.lua), and its entries."""
        item = _b(change.item_key)
        view = change.view
        owner = self._owner_prefix.get(view.name)
        if owner is None:
            owner = self._owner_prefix[view.name] = self._prefix + _b(view.name) + b":o:"
        version = change.version
        generation = self._generations.get(version.generation)
        if generation is None:
            generation = self._generations[version.generation] = _packed_int(version.generation)
        args = [
            owner + b"%d" % (zlib.crc32(item) % self.owner_buckets),
            item,
            self._view_id(view.name),
            generation + _packed_int(int(version.sequence)),
            b"%d" % len(change.entries),
        ]
        entries: Entries = []
        if len(change.entries) == 1:
            t, key, ident, a, b = _entry_args(change.entries[0], self._entry_prefix)
            if key.startswith(self._prefix):
                raise self._in_prefix(key)
            args += (t, key, a, b)
            entries.append((t.decode(), key, ident, a))
            return args, entries
        per_ident: dict[bytes, tuple[bytes, bytes, bytes, bytes]] = {}
        types: dict[bytes, bytes] = {}
        for entry in change.entries:
            t, key, ident, a, b = _entry_args(entry, self._entry_prefix)
            if key.startswith(self._prefix):
                raise self._in_prefix(key)
            if types.setdefault(key, t) != t:
                raise _Reject(
                    f"the view yields both a {_KIND[types[key].decode()]} and a "
                    f"{_KIND[t.decode()]} at key {_text(key)!r}; a key has one type"
                )
            per_ident[ident] = (t, key, a, b)
        args[4] = b"%d" % len(per_ident)  # duplicates: the last one of an identity counts
        for ident, (t, key, a, b) in per_ident.items():
            args += (t, key, a, b)
            entries.append((t.decode(), key, ident, a))
        return args, entries

    def _in_prefix(self, key: bytes) -> _Reject:
        return _Reject(
            f"entry key {_text(key)!r} is inside viewkeeper's bookkeeping "
            f"prefix {self.key_prefix!r}; use another key in the view"
        )

    def _result(self, change: Change, entries: Entries, reply: Any) -> Result:
        code = int(reply[0])
        if code == -2:  # arguments this client does not send: the script refused them
            t, key, _, sub = entries[int(reply[1]) - 1]
            what, arg = _text(reply[2]), _text(reply[3])
            entry = _describe(t, key, sub) if t in _KIND else f"entry {_text(key)!r}"
            return Result(
                Outcome.ERROR,
                self._where(change)
                + f"the {what} {arg[:100]!r} of {entry} is not one Redis takes (a ttl is "
                f"whole seconds from 1 to {MAX_TTL}, a score a number), nothing of the change "
                "was written; the view API does not build such an entry: was it changed after "
                "it was built?",
            )
        if code == -1:
            t, key, _, _ = entries[int(reply[1]) - 1]
            return Result(
                Outcome.ERROR,
                (
                    f"key {_text(key)!r} holds a {_text(reply[2])}, view {change.view.name} writes "
                    f"a {_KIND[t]} there (item {change.item_key!r}); delete or rename that key, or "
                    "change the view so that each Redis key keeps one type"
                ),
            )
        collisions = []
        for j in range(1, len(reply), 2):
            t, key, ident, sub = entries[int(reply[j]) - 1]
            other_view, other_item = self._claim_owner(ident, reply[j + 1])
            if other_view != change.view.name:
                other_item = f"{other_item} (view {other_view})"
            collisions.append(Collision(_describe(t, key, sub), other_item))
        return Result(Outcome.APPLIED, collisions=collisions)

    def _claim_owner(self, ident: bytes, claim: bytes) -> tuple[str, str]:
        i = 0
        while i < len(claim) and claim[i : i + 1].isdigit():
            i += 1
        if claim[i : i + 1] == b"=":
            item = ident[claim[i + 1] : claim[i + 1] + claim[i + 2]]
        else:
            item = claim[i + 1 :]
        return self._view_name(claim[:i]), _text(item)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures with backoff for ``retry_seconds``."""
        try:
            for attempt in Retrying(
                stop=stop_after_delay(self.retry_seconds),
                reraise=True,
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception(_is_transient),
            ):
                with attempt:
                    return fn()
        except AuthenticationError as exc:
            raise SinkUnavailable(
                f"redis sink {self.name!r} at {self.where}: authentication "
                f"failed ({self._scrub(str(exc))}); check the URL's "
                "password or the credential file"
            ) from None
        except NoPermissionError as exc:
            raise SinkUnavailable(
                f"redis sink {self.name!r} at {self.where}: permission refused after retrying "
                f"for {self.retry_seconds:g}s ({self._scrub(str(exc))}); the batch is held: "
                "give the user the commands (+evalsha +script|load +hgetall ...) and keys "
                "(~*) viewkeeper writes"
            ) from None
        except Exception as exc:
            if not _is_transient(exc):
                raise
            raise SinkUnavailable(
                f"redis sink {self.name!r} at {self.where} is unavailable after retrying for "
                f"{self.retry_seconds:g}s: {type(exc).__name__}: {self._scrub(str(exc))}"
            ) from None
        raise AssertionError("unreachable")
