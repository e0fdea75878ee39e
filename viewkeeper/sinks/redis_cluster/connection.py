"""The connection: the cluster client, the sink's state, and the one way calls are sent.

Owns ``__init__``, the key names (README.md, "Key layout"), :meth:`_Connection._run`: many
calls of ``cluster_slot.lua``, each in one slot, sent at once (grouped by node, every node
written before any is read: redis-py's cluster pipeline), the ones that failed for the
cluster's state (a failover, a migrating slot: MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a lost
connection) sent again until ``retry_seconds``, and the script loaded again where a node does
not have it (a promoted replica, a new node); the view ids (``vk:views``) and the bucket
count (``vk:meta``), as the standalone sink keeps them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.sinks.redis.connection import _is_transient, with_retry
from viewkeeper.sinks.redis.packing import _b, _text, tag_for_slot

log = logging.getLogger("viewkeeper.sinks.redis_cluster")
T = TypeVar("T")
SLOTS = 16384

# The cluster's state, not the call's: redirections that ran out ("TTL exhausted" while slots
# migrate), a slot not covered during a failover. Sent again until retry_seconds.
_CLUSTER_STATE = (
    ClusterError,
    ClusterDownError,
    MovedError,
    AskError,
    TryAgainError,
    SlotNotCoveredError,
    redis.ConnectionError,
    redis.TimeoutError,
)

Call = tuple[list[bytes], list[bytes]]  # one script call: its keys (one slot), its arguments


def _load(name: str) -> bytes:
    return resources.files("viewkeeper.sinks.redis_cluster").joinpath(name).read_bytes()


_INCLUDE = b"-- @include redis_sums.lua (the counters' exact sums: connection.py puts it here)\n"


def _load_sums() -> bytes:
    return resources.files("viewkeeper.sinks.redis").joinpath("redis_sums.lua").read_bytes()


def _load_views_script() -> bytes:
    return resources.files("viewkeeper.sinks.redis").joinpath("redis_views.lua").read_bytes()


class _Connection:
    """The sink's state and its calls' plumbing; the layers above it add the rest."""

    def __init__(
        self,
        name: str,
        client: RedisCluster | None = None,
        *,
        url: str | None = None,
        key_prefix: str = "vk:",
        entry_prefix: str = "",
        owner_buckets: int = 1024,
        tombstone_retention: float = 48 * 3600,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = 5.0,
        batch_size: int = 500,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError(f"redis sink {name!r}: give a client or a url")
            client = RedisCluster.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
            self._owns_client = True
        else:
            self._owns_client = False
        kw = client.nodes_manager.connection_kwargs
        if kw.get("decode_responses"):
            raise ValueError(
                f"redis sink {name!r}: the client must use decode_responses=False; "
                "owner records are binary"
            )
        if not 1 <= owner_buckets <= SLOTS or not key_prefix or "{" in key_prefix:
            raise ValueError(
                f"redis sink {name!r}: owner_buckets must be 1 to {SLOTS} on a cluster and "
                f"key_prefix non-empty without braces (got {owner_buckets}, {key_prefix!r})"
            )
        self.name = name
        first = client.nodes_manager.startup_nodes
        self.where = (
            "cluster " + ",".join(sorted(first)[:3]) if first else "cluster <no startup node>"
        )
        self.key_prefix = key_prefix
        self.entry_prefix = entry_prefix
        self._entry_prefix = _b(entry_prefix)
        self.owner_buckets = owner_buckets
        self.tombstone_retention = tombstone_retention
        self.retry_seconds = retry_seconds
        self.batch_size = batch_size
        self._client: Any = client  # bytes replies; redis-py's annotations assume str
        self._clock = clock
        self._secret = str(kw.get("password") or "")
        self._prefix = _b(key_prefix)
        self._src = _load("cluster_slot.lua").replace(_INCLUDE, _load_sums(), 1)
        self._sha = hashlib.sha1(self._src).hexdigest().encode()
        self._views_script = client.register_script(_load_views_script())
        self._registry = self._prefix + b"views"
        self._view_ids: dict[str, bytes] = {}
        self._view_names: dict[bytes, str] = {}
        self._markers: dict[str, bytes] = {}  # view -> the marker every slot must hold
        # (view, slot) -> the highest write counter seen there under that marker
        self._seen: dict[tuple[str, int], int] = {}
        self._seen_lock = threading.Lock()
        self._ready = False
        # per thread (each shard worker applies its own batches): the slots written since the
        # last _replicated(), and the write counters seen there, remembered only once a
        # replica has the writes (a batch held and sent again after a failover must not
        # look like a rollback)
        self._local = threading.local()
        self._no_replication_info = False

    @property
    def _written(self) -> set[int]:
        written: set[int] | None = getattr(self._local, "written", None)
        if written is None:
            written = self._local.written = set()
        return written

    @property
    def _pending_seen(self) -> dict[tuple[str, int], int]:
        pending: dict[tuple[str, int], int] | None = getattr(self._local, "seen", None)
        if pending is None:
            pending = self._local.seen = {}
        return pending

    # -- keys (README.md, "Key layout") ------------------------------------------------------
    def _tagged(self, slot: int) -> bytes:
        return self._prefix + b"{" + tag_for_slot(slot) + b"}:"

    def _claims_key(self, slot: int) -> bytes:
        """The slot's bookkeeping: entry claims and each view's marker and write counter."""
        return self._tagged(slot) + b"c"

    def _bucket_slot(self, bucket: int) -> int:
        return bucket * SLOTS // self.owner_buckets  # buckets spread evenly over the slots

    def _bucket(self, item: bytes) -> int:
        return zlib.crc32(item) % self.owner_buckets

    def _owner_keys(self, view: View | str, bucket: int) -> tuple[bytes, bytes, bytes]:
        """(claims, owner records, pending lists) of a bucket of the view: one slot."""
        vid = self._view_id(view if isinstance(view, str) else view.name)
        head = self._tagged(self._bucket_slot(bucket))
        return head + b"c", head + b"o:" + vid, head + b"p:" + vid

    def _claim_key(self, view: View | str) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + b"{" + _b(name).replace(b"}", b"") + b"}:ns"

    @staticmethod
    def _slot(key: bytes) -> int:
        return int(key_slot(key))

    # -- calls -------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _with_retry(self, fn: Callable[[], T]) -> T:
        return with_retry(
            fn, self.retry_seconds, f"redis sink {self.name!r} at {self.where}", self._scrub
        )

    def _run(self, calls: Sequence[Call], script: tuple[bytes, bytes] | None = None) -> list[Any]:
        """Run every call of ``cluster_slot.lua`` (each one slot), all at once; the replies, in
        order (``script``: another script than ``cluster_slot.lua``, as (source, sha)). A call
        that failed for the cluster's state is sent again (every step is
        idempotent: README.md, "The protocol") until ``retry_seconds``, then SinkUnavailable;
        a call that failed for itself (a key of viewkeeper's overwritten outside) answers its
        error, which its caller turns into its changes' errors."""
        src, sha = script or (self._src, self._sha)
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        deadline = time.monotonic() + self.retry_seconds
        wait = 0.02
        last: BaseException | None = None
        while todo:
            load = False
            try:
                pipe = self._client.pipeline(transaction=False)
                for i in todo:
                    keys, args = calls[i]
                    self._written.add(self._slot(keys[0]))
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                results = pipe.execute(raise_on_error=False)
            except Exception as exc:  # the whole pipeline: a node down, the cluster down
                if not _is_transient(exc) and not isinstance(exc, _CLUSTER_STATE):
                    raise
                results = [exc] * len(todo)
            again = []
            for i, res in zip(todo, results, strict=True):
                if isinstance(res, NoScriptError):
                    load = True
                    again.append(i)
                elif isinstance(res, BaseException):
                    if isinstance(res, RedisClusterException):  # a call across slots: a bug
                        raise SinkError(
                            f"redis sink {self.name!r} ({self.where}): {res} (a viewkeeper bug: "
                            "the batch is held; please report it)"
                        )
                    if not _is_transient(res) and not isinstance(res, _CLUSTER_STATE):
                        replies[i] = res  # the call's own failure: its caller decides
                        continue
                    last = res
                    again.append(i)
                else:
                    replies[i] = res
            todo = again
            if load:
                self._with_retry(lambda: self._client.script_load(src))
            if todo and not load:
                if time.monotonic() > deadline:
                    raise SinkUnavailable(
                        f"redis sink {self.name!r} at {self.where} is unavailable after "
                        f"retrying for {self.retry_seconds:g}s: {type(last).__name__}: "
                        f"{self._scrub(str(last))}"
                    )
                time.sleep(wait)
                wait = min(wait * 2, 0.5)
        return replies

    def _replicated(self, commit: bool = True) -> None:
        """Return once every master written since the last call has passed those writes to a
        replica (its offset reached the master's): a batch is acknowledged — and its records
        checkpointed — only then, so a master that dies and is replaced by its replica loses
        no acknowledged write (Redis replicates asynchronously). A master with no replica in
        the topology is not waited for; one whose replica lags past ``retry_seconds`` (cut off,
        paused) raises SinkUnavailable: the batch is held and sent again, after a failover
        to the new master. Where INFO is refused (some managed services) nothing is waited for
        (logged once); the write counters still notice a rollback (README.md, "Claims").
        apply also calls it between steps E and F (``commit`` False): an owner record is
        written only once its entries are safe, or a failover that lost the entries would
        leave the record saying they are there, and the batch sent again would be stale."""
        slots, self._local.written = self._written, set()
        if not self._no_replication_info and slots:
            self._wait_for_replicas(slots)
        if not commit:
            return
        seen, self._local.seen = self._pending_seen, {}
        with self._seen_lock:  # the batch is safe: its write counters become the marks
            for key, n in seen.items():
                if n > self._seen.get(key, 0):
                    self._seen[key] = n

    def _wait_for_replicas(self, slots: set[int]) -> None:
        """Wait (see _replicated) for a replica of each master owning one of ``slots``."""
        cache = self._client.nodes_manager.slots_cache
        masters: dict[str, Any] = {}
        for slot in slots:
            nodes = cache.get(slot) or []
            if len(nodes) > 1:  # a master with a replica
                masters[nodes[0].name] = nodes[0]
        deadline = time.monotonic() + self.retry_seconds
        for name, node in masters.items():
            target: int | None = None
            while True:
                try:
                    info = self._client.info("replication", target_nodes=node)
                except redis.ResponseError as exc:
                    if _is_transient(exc):
                        info = {}
                    else:
                        self._no_replication_info = True
                        log.warning(
                            "redis sink %s (%s): INFO replication refused (%s): batches are "
                            "acknowledged without waiting for a replica",
                            self.name,
                            self.where,
                            exc,
                        )
                        return
                except _CLUSTER_STATE:
                    info = {}
                if target is None and "master_repl_offset" in info:
                    target = int(info["master_repl_offset"])
                offsets = [
                    int(v.get("offset", -1))
                    for k, v in info.items()
                    if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
                ]
                if target is not None and offsets and max(offsets) >= target:
                    break
                if time.monotonic() > deadline:
                    raise SinkUnavailable(
                        f"redis sink {self.name!r} ({self.where}): master {name} has not "
                        f"passed this batch's writes to a replica after {self.retry_seconds:g}s; "
                        "the batch is held (a failover or a lagging replica)"
                    )
                time.sleep(0.002)

    # -- view ids and the bucket count ------------------------------------------------------
    def _view_id(self, name: str) -> bytes:
        vid = self._view_ids.get(name)
        if vid is None:
            vid = bytes(
                self._with_retry(lambda: self._views_script(keys=[self._registry], args=[name]))
            )
            self._view_ids[name], self._view_names[vid] = vid, name
        return vid

    def _view_name(self, vid: bytes) -> str:
        if vid not in self._view_names:
            raw = self._with_retry(lambda: self._client.hget(self._registry, b"#" + vid))
            self._view_names[vid] = _text(raw) if raw else f"#{_text(vid)}"
        return self._view_names[vid]

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        self._refuse_standalone()
        meta = self._prefix + b"meta"

        def check() -> Any:
            self._client.script_load(self._src)
            self._client.hsetnx(meta, "owner_buckets", self.owner_buckets)
            return self._client.hget(meta, "owner_buckets")

        stored = self._with_retry(check)
        if int(stored) != self.owner_buckets:
            raise SinkError(
                f"redis sink {self.name!r} ({self.where}): owner_buckets is {self.owner_buckets} "
                f"but the data under {self.key_prefix!r} was written with {int(stored)}; set "
                f"owner_buckets: {int(stored)} (changing it needs an empty prefix and a rebuild)"
            )
        self._ready = True

    def _refuse_standalone(self) -> None:
        """SinkError when the server is not in cluster mode (``cluster: true`` set on a
        standalone Redis)."""

        def info() -> Any:
            node = self._client.get_default_node()
            return self._client.info("cluster", target_nodes=node)

        try:
            enabled = self._with_retry(info).get("cluster_enabled")
        except redis.ResponseError:
            return  # INFO refused (an ACL): the cluster client's own discovery decides
        if not enabled:
            raise SinkError(
                f"redis sink {self.name!r} ({self.where}) is not a Redis Cluster "
                "(cluster_enabled:0): remove `cluster: true` from this connection"
            )

    def masters(self) -> list[Any]:
        """The cluster's primaries, as the client knows them now."""
        return list(self._client.get_primaries())

    def _unexpected(self, reply: Any) -> SinkError:
        return SinkError(
            f"redis sink {self.name!r} ({self.where}): the cluster script answered "
            f"{self._scrub(repr(reply))[:200]}, which this client does not know; nothing is "
            "reported applied"
        )
