"""The connection: the client and the sink's state, and what every call relies on.

Owns ``__init__`` (the client, the prefixes, the scripts, the caches), the retry loop and
which errors are the server's state rather than the command's (:func:`_is_transient`:
README.md, "A change is all or nothing", the transient and credential items), loading
``redis_apply.lua`` with or without its shebang (same section, "Shebang refusal" and
"Transient abort"), the server's limits read before the first call (same section, "Sizes"),
the bucket count kept in ``vk:meta`` and the view ids of ``vk:views`` (README.md, "Key
layout"), and the message for a reply the client does not know.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.retry import Retry
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.sinks.redis.packing import _b, _text

log = logging.getLogger("viewkeeper.sinks.redis")
T = TypeVar("T")

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
# Redis' defaults, used when CONFIG GET is refused (often disabled on managed Redis): the
# largest argument (proto-max-bulk-len) and the query buffer (client-query-buffer-limit).
_MAX_BULK = 512 * 2**20
_MAX_QUERY = 2**30


def _load(name: str) -> bytes:
    return resources.files("viewkeeper.sinks.redis").joinpath(name).read_bytes()


def with_includes(name: str, source: bytes) -> bytes:
    """``source`` (the script ``name``) with each line ``-- @include FILE (...)`` replaced by
    that file of this package: ``redis_sums.lua`` (counters' exact sums) and
    ``redis_errors.lua`` (which errors are the server's state), shared by both sinks."""
    for part in (b"redis_sums.lua", b"redis_errors.lua"):
        line = re.search(rb"^-- @include " + re.escape(part) + rb"[^\n]*\n", source, re.M)
        if line is None:
            raise AssertionError(f"{name} lost its line '-- @include {part.decode()}'")
        source = source.replace(line.group(0), _load(part.decode()), 1)
    return source


def apply_script() -> bytes:
    """``redis_apply.lua`` with its included parts (the cluster sink sends its change-log
    groups too)."""
    return with_includes("redis_apply.lua", _load("redis_apply.lua"))


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


def with_retry(fn: Callable[[], T], seconds: float, who: str, scrub: Callable[[str], str]) -> T:
    """Run ``fn``, retrying transient failures (:func:`_is_transient`) with backoff for
    ``seconds``, then raise SinkUnavailable saying why (``who``: the sink and where it is;
    ``scrub`` hides the password in messages). Both Redis sinks call through it."""
    try:
        for attempt in Retrying(
            stop=stop_after_delay(seconds),
            reraise=True,
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(_is_transient),
        ):
            with attempt:
                return fn()
    except AuthenticationError as exc:
        raise SinkUnavailable(
            f"{who}: authentication failed ({scrub(str(exc))}); check the URL's "
            "password or the credential file"
        ) from None
    except NoPermissionError as exc:
        raise SinkUnavailable(
            f"{who}: permission refused after retrying for {seconds:g}s ({scrub(str(exc))}); "
            "the batch is held: give the user the commands (+evalsha +script|load +hgetall "
            "...) and keys (~*) viewkeeper writes"
        ) from None
    except Exception as exc:
        if not _is_transient(exc):
            raise
        raise SinkUnavailable(
            f"{who} is unavailable after retrying for {seconds:g}s: "
            f"{type(exc).__name__}: {scrub(str(exc))}"
        ) from None
    raise AssertionError("unreachable")


def _cannot_compile_shebang(exc: redis.ResponseError) -> bool:
    """A compile error at the shebang: "... unexpected symbol near '#'" (Redis < 7, fakeredis)."""
    return "'#'" in str(exc) and not _is_transient(exc)


class _Connection:
    """The sink's state and its calls' plumbing; the layers above it (claims, apply,
    maintenance) and :class:`~viewkeeper.sinks.redis.sink.RedisSink` add the rest."""

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
        source = apply_script()
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

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures with backoff for ``retry_seconds``."""
        return with_retry(
            fn, self.retry_seconds, f"redis sink {self.name!r} at {self.where}", self._scrub
        )

    def _unexpected(self, reply: Any) -> SinkError:
        return SinkError(
            f"redis sink {self.name!r} ({self.where}): the apply script answered "
            f"{self._scrub(repr(reply))[:200]}, which this client does not know; nothing is "
            "reported applied (is another version of redis_apply.lua loaded under its sha, "
            "or a proxy in the way?)"
        )

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

        self._refuse_cluster()

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

    def _refuse_cluster(self) -> None:
        """Raise SinkError when the server runs in cluster mode (ElastiCache with cluster
        mode enabled, ElastiCache Serverless, MemoryDB): one apply call touches keys of many
        hash slots, which a cluster refuses (CROSSSLOT) or answers with MOVED. A server that
        does not answer ``INFO cluster`` (an ACL, a proxy) is taken as standalone."""

        def info() -> Any:
            try:
                return self._client.info("cluster")
            except redis.ResponseError:
                return {}

        if not self._with_retry(info).get("cluster_enabled"):
            return
        raise SinkError(
            f"redis sink {self.name!r} ({self.where}) is a Redis Cluster (cluster_enabled:1), "
            "but this connection is for a standalone Redis (one apply call of its sink touches "
            f"keys of many hash slots); set cluster: true on this connection (redis.{self.name}) "
            "to use the cluster sink, or point it at a standalone Redis (ElastiCache with "
            "cluster mode disabled: its primary endpoint, or a Redis or Valkey primary)"
        )

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
